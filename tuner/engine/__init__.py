"""The engine: workers that lease trials from the study database and run them, and the sweep that starts them."""
