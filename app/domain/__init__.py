"""The domain: ORM models, DTOs, errors and pure rules. No HTTP and no model code in here."""
