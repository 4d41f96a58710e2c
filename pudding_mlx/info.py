"""`pudding info`: what a bundle holds (manifest, candidate sets, file sizes); loads no model."""

from __future__ import annotations

from pathlib import Path

import click

from .bundle import MANIFEST, read_manifest, verify_files


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def info(bundle: str, verify: bool) -> None:
    """Show a bundle's manifest summary, candidate omission sets and file sizes."""
    root = Path(bundle)
    m = read_manifest(root)
    r = m.router
    click.echo(f"Bundle: {root}")
    click.echo(f"  format version {m.format_version}; base model {m.base_model}; "
               f"{m.num_blocks} blocks; protected {m.protected or 'none'}")
    coreml = "yes" if (root / "router.mlpackage").exists() else "no"
    target = r.target + ("" if r.tolerance is None else f" (default tolerance {r.tolerance:g})")
    reads = (f"in-model (a head on the LLM's hidden state after blocks 0..{r.blocks - 1}), "
             f"{r.pooling} pooling" if r.kind == "in-model"
             else f"{r.backbone}, {r.pooling} pooling, max {r.max_length} tokens")
    click.echo(f"  router: {reads}, target {target}, {len(r.outputs)} outputs; Core ML "
               f"package: {coreml}")
    for key, value in m.extra.items():
        click.echo(f"  {key}: {value}")

    click.echo("\nCandidates (router output order):")
    rows = [(str(i), c) for i, c in enumerate(m.ordered_candidates())]
    rows.append(("static", m.static))
    width = max(len(c.name) for _, c in rows)
    click.echo(f"  {'#':>6}  {'name':<{width}}  {'k':>3}  {'task':<12} {'loss':<11} skipped")
    for label, c in rows:
        blocks = ",".join(map(str, sorted(c.skip))) or "-"
        click.echo(f"  {label:>6}  {c.name:<{width}}  {len(c.skip):>3}  {c.task:<12} "
                   f"{c.loss:<11} {blocks}")

    click.echo("\nFiles:")
    groups: dict[str, list[int]] = {}
    missing = []
    for rel in m.files:
        p = root / rel
        top = rel.split("/")[0] + ("/" if "/" in rel else "")
        if p.is_file():
            groups.setdefault(top, []).append(p.stat().st_size)
        else:
            missing.append(rel)
    for top, sizes in sorted(groups.items()):
        click.echo(f"  {top:<20} {len(sizes):>4} files  {_size(sum(sizes)):>10}")
    total = sum(sum(s) for s in groups.values())
    click.echo(f"  {'total':<20} {sum(map(len, groups.values())):>4} files  {_size(total):>10}")
    for rel in missing:
        click.echo(f"  missing: {rel}")
    if verify:
        verify_files(root, m, hashes=True)
        click.echo(f"\nAll {len(m.files)} files match the sha256 in {MANIFEST}.")
