"""Services: conversation rules, the model, and running replies. No HTTP types in here."""
