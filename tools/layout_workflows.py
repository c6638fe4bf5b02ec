"""Lay out the pack's template workflows for ComfyUI's front end, and check the layout rules.

    python tools/layout_workflows.py                 # re-lay out every example_workflows/*.json in place
    python tools/layout_workflows.py --check         # only report rule violations (exit 1 if any)
    python tools/layout_workflows.py path/to/new.json

What a user sees when a template is opened from the Templates dialog is the front end's "fit view":
it scales the bounding box of all nodes (title bars included) to 75 % of the canvas
(``DragAndScale.fitToBounds``, frontend 1.45) and centres it. The front end stops drawing node text
below 8 px (``LiteGraph.Canvas.MinFontSizeForLOD``; node text is 14 units), so a template wider than
about 1900 units is unreadable in a 1600x1000 window. This script places the nodes left to right in
columns by their depth in the graph (or, "late", each node just before its first consumer), stacks the
nodes of a column, moves a node down below a wire that would pass behind it, gives every node the
front end's smallest size (``computeSize``; a smaller saved size is enlarged on load), sizes the Read-me
note from its text, tries the note and the output nodes in a few places and keeps the arrangement with
the largest fitted zoom that breaks no rule. The saved view (``extra.ds``) is that same fitted view, so opening the
file any other way (drag and drop, the workflow browser) shows the same picture.

Rules (``check`` returns one line per violation; tests/workflows/test_layout_rules.py runs it on every
shipped template):
  * text at the fitted zoom of a 1600x1000 window is at least MIN_FONT_PX pixels;
  * at that zoom no node is under the tab bar and toolbar (top CHROME_TOP px), the side bar (left
    CHROME_LEFT px) or the minimap and canvas menu (bottom-right corner), and the note is in view;
  * nodes do not overlap (title bars included, with a small margin);
  * no link passes behind a node other than the two it joins (links are sampled along the same
    bezier curve LiteGraph draws: control points a quarter of the end-to-end distance out along x).
The window geometry was measured with tools/browser_check.mjs --templates on ComfyUI 0.24 / frontend 1.45.15.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "example_workflows"

# -- the front end, as measured (frontend 1.45.15, 1600x1000 window) ------------------------------------
WINDOW = (1600, 1000)          # the canvas fills the window
FIT_ZOOM = 0.75                # fitToBounds: the bounds take 75 % of the canvas
CHROME_TOP = 100               # tab bar (0-40 px) and the Graph / Run toolbar (45-92 px)
CHROME_LEFT = 60               # the icon side bar
CHROME_CORNER = (1340, 740)    # minimap and canvas menu: x >= 1340 and y >= 740
TITLE_H = 30                   # LiteGraph.NODE_TITLE_HEIGHT
BOUNDS_PAD = 10                # fitView's bounds reach this far past the nodes' rectangles
SLOT_H = 20                    # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 24                  # a widget row (NODE_WIDGET_HEIGHT 20 + spacing)
NODE_TEXT = 14                 # LiteGraph.NODE_TEXT_SIZE, in graph units
MIN_FONT_PX = 9                # our rule; the front end draws no text below 8 px
NOTE_TYPES = ("Note", "MarkdownNote")

# -- layout choices ---------------------------------------------------------------------------------
GAP_X = 50                     # between columns
GAP_Y = 40                     # between a node's bottom and the next title bar
NOTE_CHAR_W = 7.0              # the note's textarea at zoom 1: average character width ...
NOTE_LINE_H = 16.0             # ... and line height, in graph units
NOTE_PAD = 24
NOTE_COLUMN_W = 340            # the note's width when it is a column of its own
NODE_MARGIN = 8                # nodes closer than this count as overlapping; links keep this clearance
# The smallest size the front end draws each node at (``node.computeSize()``, frontend 1.45.15): a
# smaller size in the file is enlarged to this on load, so the layout must use at least this or the
# shown nodes overlap what the script placed below them. ``tools/browser_check.mjs --templates`` fails
# on any node shown at another size than saved. TBACModelLoader's height is the measured 130 plus one
# widget row for its "weights" input, TBACSampler's the measured 362 plus one for "cache_max_skips" (neither
# measured on its own; the check passes at them).
MIN_SIZES = {
    "TBACModelLoader": (210, 154), "LoadImage": (223, 326), "TBACLadderEncode": (222, 234),
    "TBACSampler": (210, 386), "TBACDecode": (210, 98), "TBACEncodeImage": (234, 78),
    "SetLatentNoiseMask": (188, 46), "SaveImage": (210, 58), "PreviewImage": (140, 26),
    "PreviewAny": (210, 112), "TBACUnderstand": (210, 378), "TBACLadderMix": (210, 78),
    "TBACLadderInspect": (180, 66), "TBACNativeModel": (169, 26), "TBACNativeVAE": (154, 26),
    "TBACToConditioning": (210, 98), "EmptyLatentImage": (210, 106), "KSampler": (210, 262),
    "VAEDecode": (140, 46), "Note": (281, 88), "MarkdownNote": (281, 88),
}
# Our widths: the front end's smallest, rounded up (its widgets are laid out for it); wider where text is typed.
WIDTHS = {kind: max(math.ceil(w / 10) * 10, 210) for kind, (w, _) in MIN_SIZES.items()}
WIDTHS.update(TBACLadderEncode=250, TBACUnderstand=250)
# Image outputs get room for the picture, the prompt box room for a few lines; other nodes take the smallest.
HEIGHTS = {"SaveImage": 270, "PreviewImage": 250, "PreviewAny": 160, "LoadImage": 330, "TBACLadderEncode": 270}
OUTPUT_TYPES = ("SaveImage", "PreviewImage", "PreviewAny")
STACKABLE_HEIGHT = 120         # nodes up to this tall may also be stacked below their feeder


# -- geometry -----------------------------------------------------------------------------------------
def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in graph units, title bar included."""
    x, y = node["pos"]
    w, h = node["size"]
    return (x, y - TITLE_H, x + w, y + h)


def graph_bounds(graph: dict) -> tuple[float, float, float, float]:
    """The bounds the front end fits: the nodes' rectangles plus BOUNDS_PAD (measured: fitted zooms match to 0.1 %)."""
    rects = [node_rect(n) for n in graph["nodes"]]
    return (min(r[0] for r in rects) - BOUNDS_PAD, min(r[1] for r in rects) - BOUNDS_PAD,
            max(r[2] for r in rects) + BOUNDS_PAD, max(r[3] for r in rects) + BOUNDS_PAD)


def fitted_view(graph: dict, window=WINDOW) -> dict:
    """What the front end's fitView shows: {"scale", "offset"} (screen = (graph + offset) * scale)."""
    x0, y0, x1, y1 = graph_bounds(graph)
    width, height = x1 - x0, y1 - y0
    scale = min(FIT_ZOOM * window[0] / max(width, 300), FIT_ZOOM * window[1] / max(height, 300))
    offset = [-x0 - width / 2 + window[0] / scale / 2, -y0 - height / 2 + window[1] / scale / 2]
    return {"scale": round(scale, 4), "offset": [round(offset[0], 2), round(offset[1], 2)]}


def to_screen(point, view: dict) -> tuple[float, float]:
    return ((point[0] + view["offset"][0]) * view["scale"], (point[1] + view["offset"][1]) * view["scale"])


def _socket_index(node: dict, slot: int) -> tuple[int, bool]:
    """Row of input ``slot`` among the node's socket rows, and whether it sits on a widget row."""
    inputs = node.get("inputs", [])
    entry = inputs[slot]
    if "widget" in entry:
        return sum(1 for i in inputs if "widget" in i and inputs.index(i) < slot), True
    return sum(1 for i in inputs[:slot] if "widget" not in i), False


def input_pos(node: dict, slot: int) -> tuple[float, float]:
    x, y = node["pos"]
    row, on_widget = _socket_index(node, slot)
    if on_widget:  # widget sockets are drawn beside their widget, below the socket rows
        sockets = max(sum(1 for i in node.get("inputs", []) if "widget" not in i), len(node.get("outputs", [])))
        return (x, y + sockets * SLOT_H + 10 + (row + 0.5) * WIDGET_H)
    return (x, y + (row + 0.7) * SLOT_H)


def output_pos(node: dict, slot: int) -> tuple[float, float]:
    x, y = node["pos"]
    return (x + node["size"][0], y + (slot + 0.7) * SLOT_H)


def bezier(a, b, samples: int = 40) -> list[tuple[float, float]]:
    """LiteGraph's link spline from an output (going right) to an input (coming from the left)."""
    dist = math.dist(a, b) * 0.25
    p1, p2 = (a[0] + dist, a[1]), (b[0] - dist, b[1])
    out = []
    for i in range(samples + 1):
        t = i / samples
        u = 1 - t
        out.append((u**3 * a[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t**3 * b[0],
                    u**3 * a[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t**3 * b[1]))
    return out


def link_curves(graph: dict) -> list[tuple[int, int, int, list]]:
    """(link id, source id, target id, sampled points) for every link."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    return [(lid, src, dst, bezier(output_pos(nodes[src], s_slot), input_pos(nodes[dst], d_slot)))
            for lid, src, s_slot, dst, d_slot, _ in graph["links"]]


def _inside(point, rect, margin=0.0) -> bool:
    return rect[0] - margin < point[0] < rect[2] + margin and rect[1] - margin < point[1] < rect[3] + margin


def _overlap(a, b, margin=0.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def check(graph: dict, window=WINDOW) -> list[str]:
    """The layout rules (module docstring); one line per violation."""
    problems = []
    view = fitted_view(graph, window)
    font = NODE_TEXT * view["scale"]
    if font < MIN_FONT_PX:
        problems.append(f"text is {font:.1f} px at the fitted zoom {view['scale']:.3f}; the rule is >= {MIN_FONT_PX} px")
    saved = graph.get("extra", {}).get("ds")
    if saved != view:
        problems.append(f"saved view extra.ds {saved} is not the fitted view {view}")
    label = {n["id"]: f"node {n['id']} ({n['type']})" for n in graph["nodes"]}
    for node in graph["nodes"]:
        x0, y0, x1, y1 = node_rect(node)
        (sx0, sy0), (sx1, sy1) = to_screen((x0, y0), view), to_screen((x1, y1), view)
        if sy0 < CHROME_TOP or sx0 < CHROME_LEFT or sx1 > window[0] or sy1 > window[1]:
            problems.append(f"{label[node['id']]} is at {sx0:.0f},{sy0:.0f}-{sx1:.0f},{sy1:.0f} px: under the "
                            f"tab bar / toolbar (y < {CHROME_TOP}) or the side bar (x < {CHROME_LEFT}) or off-screen")
        if sx1 > CHROME_CORNER[0] and sy1 > CHROME_CORNER[1]:
            problems.append(f"{label[node['id']]} reaches {sx1:.0f},{sy1:.0f} px: under the minimap / canvas menu")
    if not any(n["type"] in NOTE_TYPES for n in graph["nodes"]):
        problems.append("no Read-me note")
    for a, b in itertools.combinations(graph["nodes"], 2):
        if _overlap(node_rect(a), node_rect(b), NODE_MARGIN):
            problems.append(f"{label[a['id']]} and {label[b['id']]} overlap")
    rects = {n["id"]: node_rect(n) for n in graph["nodes"]}
    for lid, src, dst, points in link_curves(graph):
        box = (min(p[0] for p in points), min(p[1] for p in points), max(p[0] for p in points), max(p[1] for p in points))
        for nid, rect in rects.items():
            if not _overlap(box, rect, NODE_MARGIN):
                continue
            if nid == src:  # a wire that loops back behind its own node (e.g. to a node stacked below it)
                behind = any(_inside(p, rect) and p[0] < rect[2] - 2 for p in points)
            elif nid == dst:
                behind = any(_inside(p, rect) and p[0] > rect[0] + 2 for p in points)
            else:
                behind = any(_inside(p, rect, NODE_MARGIN) for p in points)
            if behind:
                problems.append(f"link {lid} ({label[src]} -> {label[dst]}) runs behind {label[nid]}")
    return problems


# -- layout -------------------------------------------------------------------------------------------
def _columns(graph: dict, stacked: frozenset = frozenset(), late: bool = False) -> dict[int, int]:
    """Column of every non-note node: the longest path from a node without inputs.

    A node in ``stacked`` takes the column of its deepest feeder (it is stacked below it). With ``late``
    a node that feeds others (and is not a source such as the model loader) then moves right to the column
    just before its first consumer, so a wire into a far column does not cross the columns in between.
    """
    ids = [n["id"] for n in graph["nodes"] if n["type"] not in NOTE_TYPES]
    preds = {i: set() for i in ids}
    for _, src, _, dst, _, _ in graph["links"]:
        preds[dst].add(src)
    column: dict[int, int] = {}

    def depth(i, seen=()):
        if i not in column:
            if i in seen:
                raise ValueError(f"cycle through node {i}")
            step = 0 if i in stacked else 1
            column[i] = max((depth(p, seen + (i,)) + step for p in preds[i]), default=0)
        return column[i]

    for i in ids:
        depth(i)
    if late:
        succs = {i: [] for i in ids}
        for _, src, _, dst, _, _ in graph["links"]:
            succs[src].append(dst)
        for i in sorted(ids, key=lambda i: -column[i]):  # consumers are settled before their feeders
            if preds[i] and succs[i] and i not in stacked:
                column[i] = max(column[i], min(column[d] - (0 if d in stacked else 1) for d in succs[i]))
    return column


def note_height(text: str, width: float) -> float:
    per_line = max(1, int((width - NOTE_PAD) / NOTE_CHAR_W))
    lines = sum(max(1, math.ceil(len(par) / per_line)) for par in text.split("\n"))
    return max(math.ceil(lines * NOTE_LINE_H + NOTE_PAD), MIN_SIZES["Note"][1])


def layout_size(node: dict) -> list:
    """The size the layout gives a (non-note) node: our width, and the front end's smallest height rounded up."""
    if node["type"] not in WIDTHS:
        return list(node["size"])
    return [WIDTHS[node["type"]], HEIGHTS.get(node["type"], math.ceil(MIN_SIZES[node["type"]][1] / 10) * 10)]


def _arrange(graph: dict, column: dict[int, int], note_span: int, order_key, stair: int, gap_x: float = GAP_X) -> dict:
    """Positions for one choice.

    ``note_span``: the note spans the first columns on top (0: it heads column 0 instead; -1: it is a
    column of its own on the left; -2: on the right).
    ``stair``: 0 puts every column's first node on one line; > 0 puts the nodes fed from column 0 below
    column 0's last output and raises each column by ``stair`` over the one before it, so wires leaving
    column 0 (the model wire above all) pass above the nodes they do not enter.
    """
    out = copy.deepcopy(graph)
    nodes = {n["id"]: n for n in out["nodes"]}
    for node in out["nodes"]:
        if node["type"] not in NOTE_TYPES:
            node["size"] = layout_size(node)
    n_cols = max(column.values()) + 1
    members = [sorted((i for i, c in column.items() if c == col), key=order_key) for col in range(n_cols)]
    widths = [max(nodes[i]["size"][0] for i in m) for m in members]
    notes = [n for n in out["nodes"] if n["type"] in NOTE_TYPES]
    if notes and note_span == 0:  # the note heads column 0: the column is at least the note's smallest width
        widths[0] = max(widths[0], WIDTHS[notes[0]["type"]])
    shift = NOTE_COLUMN_W + gap_x if note_span == -1 else 0
    wide_first = gap_x if stair else 0  # steep wires out of column 0 need room to turn
    xs = [shift + sum(widths[:c]) + gap_x * c + (wide_first if c else 0) for c in range(n_cols)]
    note_span = min(note_span, n_cols)
    top = 0.0
    col0_top = 0.0
    for note in notes if note_span < 0 else ():
        x = 0 if note_span == -1 else xs[-1] + widths[-1] + gap_x
        note["pos"], note["size"] = [x, TITLE_H], [NOTE_COLUMN_W, note_height(note["widgets_values"][0], NOTE_COLUMN_W)]
    for note in notes if note_span >= 0 else ():
        width = xs[note_span - 1] + widths[note_span - 1] if note_span else widths[0]
        height = note_height(note["widgets_values"][0], width)
        note["pos"], note["size"] = [0, top + TITLE_H], [width, height]
        bottom = top + TITLE_H + height + GAP_Y
        if note_span:
            top = bottom
        else:
            col0_top = bottom
    y = top + col0_top
    reaches_far = {src for _, src, _, dst, _, _ in graph["links"] if column.get(src) == 0 and column.get(dst, 0) >= 2}
    last_output = top
    for i in members[0]:
        nodes[i]["pos"] = [xs[0], y + TITLE_H]
        if i in reaches_far:  # the nodes further right start below its wires
            last_output = y + TITLE_H + (len(nodes[i].get("outputs", [])) - 0.3) * SLOT_H
        y += TITLE_H + nodes[i]["size"][1] + GAP_Y
    base = max(top, last_output + NODE_MARGIN + 4) if stair else top
    # column c sits `rise` above column c - 1: enough for the wires from column 0 into its first node
    # to pass above the title bar of column c - 1 (they reach their socket's height before the gap)
    rises = [0] * n_cols
    for col in range(2, n_cols):
        first = nodes[members[col][0]]
        rows = [_socket_index(first, d_slot)[0] for _, src, _, dst, d_slot, _ in graph["links"]
                if dst == first["id"] and column.get(src) == 0]
        rises[col] = (max(rows, default=0) * SLOT_H + 0.7 * SLOT_H + TITLE_H + NODE_MARGIN + stair) if rows else 0
    for col in range(1, n_cols):
        y = base + sum(rises[col + 1:]) if stair else top
        for i in members[col]:
            nodes[i]["pos"] = [xs[col], y + TITLE_H]
            y += TITLE_H + nodes[i]["size"][1] + GAP_Y
    _push_below_wires(out)
    return out


def _push_below_wires(graph: dict, rounds: int = 12) -> None:
    """Move a node that a passing wire (one that neither starts nor ends at it) runs behind down below
    that wire, together with the nodes under it in its column; repeat while that helps (in place)."""
    for _ in range(rounds):
        moved = False
        for _, src, dst, points in link_curves(graph):
            box = (min(p[0] for p in points), min(p[1] for p in points), max(p[0] for p in points), max(p[1] for p in points))
            for node in graph["nodes"]:
                if node["id"] in (src, dst) or node["type"] in NOTE_TYPES:
                    continue
                rect = node_rect(node)
                if not _overlap(box, rect, NODE_MARGIN):
                    continue
                if not any(_inside(p, rect, NODE_MARGIN) for p in points):
                    continue
                lowest = max(p[1] for p in points if rect[0] - NODE_MARGIN < p[0] < rect[2] + NODE_MARGIN)
                dy = math.ceil(lowest + NODE_MARGIN + 2 - rect[1])
                for other in graph["nodes"]:  # the node and everything below it in its column
                    if other["pos"][0] == node["pos"][0] and other["pos"][1] >= node["pos"][1]:
                        other["pos"] = [other["pos"][0], other["pos"][1] + dy]
                moved = True
                break
            if moved:
                break
        if not moved:
            return


def layout(graph: dict, window=WINDOW) -> tuple[dict, list[str], str]:
    """(the graph with new positions, note size and saved view, the rules it still breaks, how it was chosen)."""
    types = {n["id"]: n["type"] for n in graph["nodes"]}
    heights = {n["id"]: layout_size(n)[1] for n in graph["nodes"]}
    preds: dict[int, list[int]] = {}
    for _, src, _, dst, _, _ in graph["links"]:
        preds.setdefault(dst, []).append(src)
    sinks = [i for i in types if types[i] in OUTPUT_TYPES]
    # output nodes and short nodes may sit below the node that feeds them (saves a column)
    stackable = [i for i in types if i in preds and (i in sinks or heights[i] <= STACKABLE_HEIGHT)]
    candidates, tried, best_clean = [], 0, 0.0
    for pull, late in itertools.product(itertools.product((0, 1), repeat=len(stackable)), (False, True)):
        column = _columns(graph, frozenset(i for i, pulled in zip(stackable, pull) if pulled), late)
        n_cols = max(column.values()) + 1
        for order in ("id", "reverse", "feed"):
            def key(i, column=column, order=order):
                if order in ("id", "reverse"):
                    return (i in sinks, i if order == "id" else -i)
                feeders = preds.get(i, [])
                return (i in sinks, sum(column[p] for p in feeders) / max(1, len(feeders)), i)
            for note_span, stair in itertools.product(range(-2, min(n_cols, 3) + 1), (0, 8, 30)):
                arranged = _arrange(graph, column, note_span, key, stair)
                arranged.setdefault("extra", {})["ds"] = fitted_view(arranged, window)
                tried += 1
                if arranged["extra"]["ds"]["scale"] < best_clean:
                    continue  # a smaller zoom than a rule-keeping arrangement found already: cannot win
                problems = check(arranged, window)
                if not problems:
                    best_clean = arranged["extra"]["ds"]["scale"]
                choice = f"note {note_span}, stair {stair}, order {order}, stacked {pull}, {'late' if late else 'early'}"
                candidates.append((len(problems), -arranged["extra"]["ds"]["scale"], problems, arranged, choice))
    # fewest broken rules first (a too small font counts like any other), then the largest zoom
    candidates.sort(key=lambda c: (c[0], c[1]))
    _, _, problems, best, choice = candidates[0]
    return best, problems, f"best of {tried} arrangements: {choice}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="UI-format workflows (default: example_workflows/*.json)")
    parser.add_argument("--check", action="store_true", help="only report rule violations")
    args = parser.parse_args(argv)
    files = args.files or sorted(TEMPLATES.glob("*.json"))
    status = 0
    for path in files:
        graph = json.loads(path.read_text(encoding="utf-8"))
        if args.check:
            problems = check(graph)
            status |= bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {path.name}: fitted zoom {fitted_view(graph)['scale']:.3f}")
            for p in problems:
                print(f"  - {p}")
            continue
        arranged, problems, how = layout(graph)
        path.write_text(json.dumps(arranged, indent=2) + "\n", encoding="utf-8")
        view = arranged["extra"]["ds"]
        x0, y0, x1, y1 = graph_bounds(arranged)
        print(f"{'FAIL' if problems else 'ok  '} {path.name}: {x1 - x0:.0f} x {y1 - y0:.0f} units, fitted zoom "
              f"{view['scale']:.3f} (text {NODE_TEXT * view['scale']:.1f} px); {how}")
        for p in problems:
            print(f"  - still broken: {p}")
        status |= bool(problems)
    return status


if __name__ == "__main__":
    sys.exit(main())
