"""Digital-twin phantom: chest radiographs rendered from a real CT, two acquisition chains."""
