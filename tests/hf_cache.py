"""A fake Hugging Face cache in the Hub's own on-disk layout, for tests that must not touch the network."""

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hf_cache(root, ckpt_dir, repo):
    """Put `repo` at REVISION into the cache at `root`: refs/main names the snapshot, whose files link
    to the checkpoint's.  Returns the snapshot directory."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    for f in ckpt_dir.iterdir():
        (snap / f.name).symlink_to(f)
    return snap
