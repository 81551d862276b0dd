"""fedcrm: federated training on enterprises' CRM data without moving it."""

__version__ = "0.1.0"
