"""The participant process: loads its own CRM data, trains locally, and talks to the aggregator over mutual TLS."""
