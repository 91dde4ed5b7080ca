"""A run's home in storage: its directories, metrics and plots. No Ray."""
