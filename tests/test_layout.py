"""The deployment boundary in code: common/ imports neither side; sites/ and server/ never
import each other (they meet only through Flower messages)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": {"sites", "server"}, "sites": {"server"}, "server": {"sites"}}


def imported_packages(py: Path) -> set[str]:
    tree = ast.parse(py.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_packages_respect_the_boundary():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for py in (REPO / pkg).rglob("*.py"):
            hits = imported_packages(py) & forbidden
            if hits:
                bad.append(f"{py.relative_to(REPO)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)
