"""Path containment, the one check every "does this stay inside that folder" question goes through."""
from __future__ import annotations

import os


def is_inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it. Compare like with like: both real (symlink-free) paths,
    or both normalized absolute ones -- this function resolves nothing itself."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:      # different drives on Windows, or one relative and one absolute path
        return False
