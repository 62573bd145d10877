"""The golden files in tests/golden/ are the reference code's outputs, byte for byte: they match
the checksums recorded when they were copied (SHA256SUMS) and, where the team's shared copy is
beside the clone, that copy too."""
import hashlib

from tests.conftest import GOLDEN, SHARED_GOLDEN


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest() -> dict[str, str]:
    lines = (GOLDEN / "SHA256SUMS").read_text().splitlines()
    return {name.strip(): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_golden_files_match_their_checksums_and_the_shared_copy():
    manifest = _manifest()
    assert {"llamagen_gpt_tiny.pt", "cca_loss.json", "var_tiny_var.pt", "var_tiny_vae.pt"} <= set(manifest)
    for name, digest in manifest.items():
        assert _digest(GOLDEN / name) == digest, f"tests/golden/{name} differs from SHA256SUMS"
    if SHARED_GOLDEN.is_dir():  # the team's layout: keep in sync with ../shared/golden
        shared = {p.name: _digest(p) for p in SHARED_GOLDEN.iterdir() if p.is_file()}
        stale = sorted(name for name, digest in shared.items() if manifest.get(name) != digest)
        assert not stale, f"tests/golden is out of date for {stale}: copy them from {SHARED_GOLDEN} and " \
                          "regenerate SHA256SUMS"
