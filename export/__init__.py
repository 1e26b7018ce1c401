"""blockskip.export: desktop side. Loads a diffusers DiT, plans, and writes a device bundle."""
