#!/usr/bin/env bash
# Prints the project's version: csi_driver/__init__.py's __version__, which pyproject.toml also
# reads (one place). Optional argument: the tree to read it from (default: this repository).
set -euo pipefail
tree=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$tree/csi_driver/__init__.py")
if [ -z "$version" ]; then
    echo "version.sh: no __version__ = \"...\" line in $tree/csi_driver/__init__.py" >&2
    exit 1
fi
printf '%s\n' "$version"
