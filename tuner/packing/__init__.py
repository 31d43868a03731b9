"""Trial packing: K trials of one study trained at once as one fused model."""
