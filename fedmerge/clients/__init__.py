"""Clients: the Flower ClientApp and the local trainer."""
