"""What runs at a hospital: the Flower ClientApp, site adapters, the image cache and splits."""
