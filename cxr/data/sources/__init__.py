"""Built-in dataset layouts; importing this package registers them."""
