"""Exact block-max pooling engine behind ``spp.spatial_pyramid_pool`` and ``spp.pool_windows``.

Private: use :mod:`spp_detect.ops.spp`. Shapes: R windows, C channels, H/W the map size, n bins per
side of a level, D = C·Σn² pooled dim. Bins are those of the ``spp`` module docstring
(``docs/method.md``, "Spatial pyramid pooling"), with integer edges.

Each bin is a range max answered from block-max tables of the map (max over 2^a × 2^b cells, a
sparse table): a bin is covered by ⌈h/2^a⌉ × ⌈w/2^b⌉ blocks, so with unlimited a, b four
look-ups suffice; the largest block size is chosen per map to balance building tables against
look-ups. Look-ups are vectorised gathers over all windows of a map (no Python loop over
windows); windows are sorted by the look-ups they need, so look-up rank k runs over a prefix.
The plan (which tables, which cells, the window order) is made on the CPU from the CPU cells and
copied to the map's device in one queued copy, so the map's device is never read back
(docs/method.md#gpu-path).
A level that divides a finer one (3, 2, 1 of 6) is the max over groups of the finer level's
bins, exactly: the union of bins j·r … j·r+r−1 of level n·r is bin j of level n. On the CPU the
windows go in chunks whose bins fit in the L2 cache (docs/benchmarks-history.md).

Entry point: :func:`pool_into`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from spp_detect.runtime.device import to_device

__all__ = ["check_cells", "pool_into"]


def bin_edges(start: Tensor, length: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Absolute [first, end) cells (R, n) of the n bins over ``length`` cells from ``start``."""
    j = torch.arange(n, device=start.device)
    first = start[:, None] + torch.div(j * length[:, None], n, rounding_mode="floor")
    end = start[:, None] - torch.div(-(j + 1) * length[:, None], n, rounding_mode="floor")
    return first, end


def _floor_log2(values: Tensor) -> Tensor:
    """⌊log2 v⌋ for positive integers, exactly (frexp gives v = m·2^e with m in [0.5, 1))."""
    return torch.frexp(values.double())[1].long() - 1


MAX_BLOCK_LOG2 = 3  # tables of blocks up to 8×8 cells at most; larger bins take more look-ups
CODE_BASE = MAX_BLOCK_LOG2 + 1  # a table (a, b) is numbered a·CODE_BASE + b
TABLE_CELL_COST = 1.0  # cost of one table cell built, relative to one look-up (both move C values)
POOL_CHUNK_BYTES = 1 << 20  # CPU: directly pooled bins per chunk of windows, about an L2 cache


def _block_plan(length: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """Per bin side: block exponent a = min(⌊log2 length⌋, limit) and look-ups ⌈length / 2^a⌉.

    Look-up t starts at min(start + t·2^a, end − 2^a): the blocks cover the side exactly
    (overlaps do not change a max).
    """
    exponent = _floor_log2(length).clamp(max=limit)
    count = -torch.div(-length, 1 << exponent, rounding_mode="floor")
    return exponent, count


def _choose_limit(ranges: Sequence[tuple[Tensor, ...]], map_cells: int) -> int:
    """The block-size limit with the least estimated work: look-ups plus table cells built.

    Few or small windows on a large map are answered from the map itself (limit 0); many large
    windows pay for tables of larger blocks.
    """
    best_limit, best_cost = 0, float("inf")
    for limit in range(MAX_BLOCK_LOG2 + 1):
        lookups, top_a, top_b = 0, 0, 0
        for y0, y1, x0, x1 in ranges:
            a, rows = _block_plan(y1 - y0, limit)
            b, cols = _block_plan(x1 - x0, limit)
            lookups += int((rows.amax(dim=1) * cols.amax(dim=1)).sum()) * y0.shape[1] ** 2
            top_a, top_b = max(top_a, int(a.max())), max(top_b, int(b.max()))
        cost = lookups + TABLE_CELL_COST * map_cells * ((top_a + 1) * (top_b + 1) - 1)
        if cost < best_cost:
            best_limit, best_cost = limit, cost
    return best_limit


class _BlockTables:
    """Max over 2^a × 2^b blocks of a (H, W, C) map, for the (a, b) codes asked for only.

    Table (a, b) at (y, x) is the max over rows y … y+2^a−1 and columns x … x+2^b−1, built by
    doubling (a sparse table); the tables are stacked so one gather serves every bin.
    """

    def __init__(self, fmap_hwc: Tensor, codes: Sequence[int]) -> None:
        height, width, channels = fmap_hwc.shape
        self.height, self.width = height, width
        # on the CPU, as the look-up plans made from it
        table_id = torch.full((CODE_BASE * CODE_BASE,), -1, dtype=torch.long)
        self.tables = fmap_hwc.new_empty((len(codes), height, width, channels))
        wanted: dict[int, dict[int, int]] = {}
        for position, code in enumerate(codes):
            wanted.setdefault(code // CODE_BASE, {})[code % CODE_BASE] = position
            table_id[code] = position
        self.table_id = table_id
        rows = fmap_hwc
        for a in range(max(wanted, default=-1) + 1):
            row_slot = wanted.get(a, {}).pop(0, None)
            out = None if row_slot is None else self.tables[row_slot]
            rows = _doubled(rows, 1 << (a - 1), 0, out) if a else _copied(rows, out)
            if a in wanted:
                self._fill_columns(rows, wanted[a])
        self.flat = self.tables.view(-1, channels)

    def _fill_columns(self, rows: Tensor, wanted: dict[int, int]) -> None:
        block = rows
        for b in range(1, max(wanted, default=0) + 1):
            out = self.tables[wanted[b]] if b in wanted else None
            block = _doubled(block, 1 << (b - 1), 1, out)

    @staticmethod
    def codes_for(ranges: Sequence[tuple[Tensor, ...]], limit: int) -> list[int]:
        codes = []
        for y0, y1, x0, x1 in ranges:
            a, _ = _block_plan(y1 - y0, limit)
            b, _ = _block_plan(x1 - x0, limit)
            codes.append((a[:, :, None] * CODE_BASE + b[:, None, :]).reshape(-1))
        present = torch.bincount(torch.cat(codes), minlength=CODE_BASE * CODE_BASE)
        return present.nonzero().squeeze(1).tolist()

    def plan(self, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor, limit: int) -> dict[str, Tensor]:
        """Look-up parameters of every bin (R, n, n) for rows [y0, y1) × columns [x0, x1),
        and ``window_lookups`` (R,): the most look-ups any bin of the window needs. On the CPU,
        as the bin edges."""
        shape = (y0.shape[0], y0.shape[1], y0.shape[1])
        a, rows_needed = _block_plan(y1 - y0, limit)
        b, cols_needed = _block_plan(x1 - x0, limit)
        table = self.table_id[a[:, :, None] * CODE_BASE + b[:, None, :]]
        row_step, col_step = 1 << a, 1 << b
        per_bin = {
            "base": table * (self.height * self.width),
            "y0": y0[:, :, None], "y_last": (y1 - row_step)[:, :, None],
            "y_step": row_step[:, :, None], "x0": x0[:, None, :],
            "x_last": (x1 - col_step)[:, None, :], "x_step": col_step[:, None, :],
            "cols_needed": cols_needed[:, None, :],
        }  # fmt: skip
        plan = {key: value.expand(shape).contiguous() for key, value in per_bin.items()}
        plan["window_lookups"] = rows_needed.amax(dim=1) * cols_needed.amax(dim=1)
        return plan

    def query(self, plan: dict[str, Tensor]) -> Tensor:
        """Range maxima (R, n, n, C) of a :meth:`plan` (its windows in any order), its per-bin
        parameters on the tables' device and ``window_lookups`` on the CPU.

        Look-up rank k runs for every window whose ``window_lookups`` exceed k, at once; with
        windows sorted by need (descending) those are a prefix. A bin needing fewer look-ups than
        its window repeats its last block (clamped), which leaves the max unchanged.
        """
        count, n, _ = plan["base"].shape
        bins = {key: value.reshape(-1) for key, value in plan.items() if key != "window_lookups"}
        result = self.flat.index_select(0, self._lookup(bins, 0, count * n * n))
        gathered = torch.empty_like(result)
        need = plan["window_lookups"]
        for rank in range(1, int(need.max())):
            prefix = (int(torch.nonzero(need > rank).max()) + 1) * n * n
            torch.index_select(
                self.flat, 0, self._lookup(bins, rank, prefix), out=gathered[:prefix]
            )
            torch.maximum(result[:prefix], gathered[:prefix], out=result[:prefix])
        return result.view(count, n, n, -1)

    def _lookup(self, bins: dict[str, Tensor], rank: int, prefix: int) -> Tensor:
        """Flat table rows of look-up ``rank`` of the first ``prefix`` bins."""
        part = {key: value[:prefix] for key, value in bins.items()}
        row_rank = torch.div(rank, part["cols_needed"], rounding_mode="floor")
        col_rank = rank - row_rank * part["cols_needed"]
        rows = torch.minimum(part["y0"] + row_rank * part["y_step"], part["y_last"])
        cols = torch.minimum(part["x0"] + col_rank * part["x_step"], part["x_last"])
        return part["base"] + rows * self.width + cols


def _copied(table: Tensor, out: Tensor | None) -> Tensor:
    return table if out is None else out.copy_(table)


def _doubled(table: Tensor, shift: int, dim: int, out: Tensor | None = None) -> Tensor:
    """Block max doubled along ``dim``: out[i] = max(t[i], t[i + shift]) where i + shift fits.

    The last ``shift`` entries keep t's values; no query reads them (a block of the doubled
    size starting there would leave the map).
    """
    out = torch.empty_like(table) if out is None else out
    size = table.shape[dim]
    kept = min(shift, size)
    out.narrow(dim, size - kept, kept).copy_(table.narrow(dim, size - kept, kept))
    if shift < size:
        torch.maximum(
            table.narrow(dim, 0, size - shift),
            table.narrow(dim, shift, size - shift),
            out=out.narrow(dim, 0, size - shift),
        )
    return out


def level_plan(levels: Sequence[int]) -> dict[int, int | None]:
    """For each distinct level, the finer level it is reduced from (None: pooled directly).

    The source is the smallest multiple present, so that the reduction groups are smallest.
    """
    plan: dict[int, int | None] = {}
    for n in sorted(set(levels), reverse=True):
        multiples = [m for m in plan if m % n == 0]
        plan[n] = min(multiples) if multiples else None
    return plan


def _coarsen(pooled: Tensor, n: int) -> Tensor:
    """(R, N, N, C) bins → (R, n, n, C) bins of a level n dividing N: max over r × r groups,
    columns first, then rows."""
    count, fine, _, channels = pooled.shape
    ratio = fine // n
    by_columns = pooled.view(count, fine, n, ratio, channels)
    columns = by_columns[:, :, :, 0]
    for b in range(1, ratio):
        columns = torch.maximum(columns, by_columns[:, :, :, b])
    by_rows = columns.view(count, n, ratio, n, channels)
    result = by_rows[:, :, 0]
    for a in range(1, ratio):
        result = torch.maximum(result, by_rows[:, :, a])
    return result


def _prepare(
    fmap: Tensor, cells: Tensor, level_plan: dict[int, int | None]
) -> tuple[_BlockTables, dict[int, dict[str, Tensor]], Tensor | None]:
    """The block tables of ``fmap`` and the look-up plan of every directly pooled level of
    ``level_plan`` (:func:`level_plan`), windows in the returned order (indices (R,) into the CPU
    ``cells``, on the CPU; None: their own order). The plans' per-bin parameters are moved to
    ``fmap``'s device in one copy; ``window_lookups`` stays on the CPU."""
    left, top, right, bottom = cells.unbind(dim=1)
    ranges = {}
    for n in (n for n, source in level_plan.items() if source is None):
        y0, y1 = bin_edges(top, bottom - top + 1, n)
        x0, x1 = bin_edges(left, right - left + 1, n)
        ranges[n] = (y0, y1, x0, x1)
    limit = _choose_limit(list(ranges.values()), fmap.shape[1] * fmap.shape[2])
    table = _BlockTables(
        fmap.permute(1, 2, 0).contiguous(), _BlockTables.codes_for(list(ranges.values()), limit)
    )
    lookup_plans = {n: table.plan(*r, limit) for n, r in ranges.items()}
    need = lookup_plans[max(lookup_plans)]["window_lookups"]  # the finest direct level leads
    order = None
    if int(need.min()) != int(need.max()):
        order = torch.argsort(need, descending=True, stable=True)
        lookup_plans = {
            n: {key: value[order] for key, value in p.items()} for n, p in lookup_plans.items()
        }
    return table, _plans_to(lookup_plans, fmap.device), order


def _plans_to(
    lookup_plans: dict[int, dict[str, Tensor]], device: torch.device
) -> dict[int, dict[str, Tensor]]:
    """The look-up plans with their per-bin parameters on ``device`` (one queued copy);
    ``window_lookups`` stays on the CPU, where :meth:`_BlockTables.query` reads it."""
    keys = [(n, key) for n, p in lookup_plans.items() for key in p if key != "window_lookups"]
    moved = to_device([lookup_plans[n][key] for n, key in keys], device)
    result = {n: {"window_lookups": p["window_lookups"]} for n, p in lookup_plans.items()}
    for (n, key), value in zip(keys, moved, strict=True):
        result[n][key] = value
    return result


def _pool_chunk(
    table: _BlockTables,
    lookup_plans: dict[int, dict[str, Tensor]],
    rows: slice,
    level_plan: dict[int, int | None],
) -> dict[int, Tensor]:
    """Channel-last bins (r, n, n, C) of each level of ``level_plan`` for the windows ``rows``
    of the look-up plans."""
    pooled: dict[int, Tensor] = {}
    for n, source in level_plan.items():  # finest first, so a source is always ready
        if source is None:
            pooled[n] = table.query({key: value[rows] for key, value in lookup_plans[n].items()})
        else:
            pooled[n] = _coarsen(pooled[source], n)
    return pooled


def check_cells(cells: Tensor, fmap_hw: tuple[int, int]) -> None:
    """ValueError unless every cell window (R, 4) is non-empty and inside the (H, W) map."""
    height, width = fmap_hw
    left, top, right, bottom = cells.unbind(dim=1)
    valid = (left >= 0) & (top >= 0) & (left <= right) & (top <= bottom)
    valid &= (right < width) & (bottom < height)
    if not bool(valid.all()):
        raise ValueError(f"cells must be 0-based inclusive windows inside the {height}×{width} map")


def pool_into(out: Tensor, fmap: Tensor, cells: Tensor, levels: Sequence[int]) -> Tensor | None:
    """Write the pooled windows ``cells`` (R, 4) int64 on the CPU of ``fmap`` (C, H, W) into the
    rows of ``out`` (R, D, on ``fmap``'s device), in the returned order: row i of ``out`` is
    window ``order[i]`` (``order`` (R,) int64 on the CPU; None: their own order). Levels in the
    given order, each channel-major [C][n][n]. ValueError for cells outside the map. Nothing is
    read back from ``fmap``'s device.

    On the CPU the windows go in chunks whose bins fit in the L2 cache, so every look-up, the
    coarser levels and the final copy read them there instead of from memory
    (docs/benchmarks-history.md); a GPU takes all windows at once.
    """
    channels, height, width = fmap.shape
    if len(cells) == 0:
        return None
    check_cells(cells, (height, width))
    plan = level_plan(levels)
    table, lookup_plans, order = _prepare(fmap, cells, plan)
    chunk = len(cells)
    if fmap.device.type == "cpu":
        bins = sum(n * n for n in lookup_plans)
        chunk = max(1, POOL_CHUNK_BYTES // (bins * channels * fmap.element_size()))
    for start in range(0, len(cells), chunk):
        rows = slice(start, start + chunk)
        pooled = _pool_chunk(table, lookup_plans, rows, plan)
        column = 0
        for n in levels:
            width_n = channels * n * n
            target = out[rows, column : column + width_n].view(-1, channels, n, n)
            target.copy_(pooled[n].permute(0, 3, 1, 2))
            column += width_n
    return order
