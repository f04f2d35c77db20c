"""Worker entry point of a TA-EB run: `python -m ebdiff.app.taeb_worker RUN_DIR`, one process per branch
(or per data-parallel rank of a branch), started by `torch.distributed.run` (`taeb.launch` does it;
`torchrun --nnodes N ... -m ebdiff.app.taeb_worker RUN_DIR` after `ebdiff ta-eb --out RUN_DIR` has
written the layout works as well). Reads RUN_DIR/config.yaml and trains this rank's branch."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ..errors import EbdiffError
    from .taeb import die_with_parent, run_rank

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ebdiff.app.taeb_worker RUN_DIR", file=sys.stderr)
        return 2
    die_with_parent()  # the torchrun agent killed: this branch stops too (saving its checkpoint)
    try:
        run_rank(Path(args[0]))
    except EbdiffError as exc:
        print(f"ebdiff: error: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
