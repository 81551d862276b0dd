"""The aggregator process: serves one federation over mutual-TLS gRPC and averages updates.

It never sees a record, only summed statistics, updates and evaluation counts,
and it never imports torch.
"""

__all__ = ["main"]


def main() -> None:
    from fedcrm_aggregator.__main__ import main as _main

    _main()
