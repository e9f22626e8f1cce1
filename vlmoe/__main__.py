import sys

from vlmoe.allocator import AllocatorError, use_tcmalloc


def run() -> None:
    """The `vlmoe` command: pick the allocator before torch loads (see vlmoe/allocator.py), then the CLI."""
    try:
        use_tcmalloc()
    except AllocatorError as exc:
        print(f"vlmoe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    from vlmoe.cli import main

    main()


if __name__ == "__main__":
    run()
