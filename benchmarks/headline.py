"""The headline table at the top of BENCHMARKS.md: every method at the four standard Omniglot settings (5- and
20-way, 1- and 5-shot) against its paper, from the result rows in benchmarks/results/.

For each method (a recipe family: the recipe name before "-omniglot", so that matching and matching-fce stay
apart) and setting, the table shows the best row by accuracy among those scored on at least 1,000 test episodes,
GPU rows preferred over CPU rows (the CPU rows are short budgets on this project's 2-core machine), with the
paper's figure, the difference, ECE, device and training time. A cell is marked "below" when the paper's figure
lies above the whole 95% confidence interval. `python benchmarks/report.py` puts it first; this script prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))
MIN_EPISODES = 1000
METHOD_ORDER = ("protonet", "matching", "matching-fce", "matching-scaled", "relation", "siamese",
                "siamese-contrastive", "r2d2", "maml", "fomaml", "anil", "metasgd", "reptile", "baseline",
                "baselinepp", "simpleshot")
TITLE = "Headline: every method at the four Omniglot settings"


def family(row: dict) -> str:
    """"matching-fce-omniglot-1shot" -> "matching-fce": the method as its recipes name it (the row's learner
    for a row without a recipe)."""
    recipe = str(row.get("recipe") or "")
    return recipe.split("-omniglot")[0] if "-omniglot" in recipe else str(row.get("method", ""))


def on_gpu(row: dict) -> bool:
    device = str(row.get("device") or "")
    return bool(device) and not device.startswith("cpu")


def eligible(row: dict) -> bool:
    """An Omniglot row at one of the four settings, scored as papers score it (1,000 episodes or more)."""
    return str(row.get("dataset", "")).startswith("omniglot") and (row.get("ways"), row.get("shots")) in SETTINGS \
        and (row.get("episodes") or 0) >= MIN_EPISODES and isinstance(row.get("accuracy"), (int, float))


def best_rows(rows: list[dict]) -> dict[tuple[str, int, int], tuple[dict, float | None]]:
    """(method, ways, shots) -> (the best row, the paper's figure for that setting, from any of the cell's rows)."""
    cells: dict[tuple[str, int, int], list[dict]] = {}
    for row in filter(eligible, rows):
        cells.setdefault((family(row), row["ways"], row["shots"]), []).append(row)
    best = {}
    for key, candidates in cells.items():
        row = max(candidates, key=lambda r: (on_gpu(r), r["accuracy"]))
        papers = [r["paper"] for r in [row, *candidates] if isinstance(r.get("paper"), (int, float))]
        best[key] = (row, papers[0] if papers else None)
    return best


def recipe_cells() -> dict[tuple[str, int, int], list[str]]:
    """(method, ways, shots) -> the shipped Omniglot recipes that evaluate that setting ({} without kshot)."""
    try:
        from kshot.recipe import load_recipe, recipe_names
    except ImportError:
        return {}
    cells: dict[tuple[str, int, int], list[str]] = {}
    for name in recipe_names():
        if "-omniglot" not in name:
            continue
        recipe = load_recipe(name)
        if recipe.dataset.get("name") != "omniglot":
            continue
        for setting in recipe.evaluate:
            if (setting.ways, setting.shots) in SETTINGS:
                cells.setdefault((family({"recipe": name}), setting.ways, setting.shots), []).append(name)
    return cells


def method_order(methods: set[str]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(methods - set(known))


def versus_paper(row: dict, paper: float | None) -> str:
    if paper is None:
        return ""
    text = f"{row['accuracy'] - paper:+.2f}"
    return f"**{text} below**" if row["accuracy"] + (row.get("ci95") or 0.0) < paper else text


def headline_table(rows: list[dict], recipes: dict[tuple[str, int, int], list[str]] | None = None) -> str:
    """The table (empty string without an eligible row), then a line naming the settings that a shipped recipe
    evaluates but no row has yet (`recipes`: `recipe_cells()` by default)."""
    best = best_rows(rows)
    if not best:
        return ""
    recipes = recipe_cells() if recipes is None else recipes
    lines = ["| method | setting | paper % | kshot % (95% CI) | vs paper | ECE % | device | train time | recipe |",
             "|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for method in method_order({key[0] for key in [*best, *recipes]}):
        for ways, shots in SETTINGS:
            if (method, ways, shots) not in best:
                if (method, ways, shots) in recipes:
                    missing.append(f"{method} {ways}-way {shots}-shot ({', '.join(recipes[method, ways, shots])})")
                continue
            row, paper = best[method, ways, shots]
            ci = row.get("ci95")
            score = f"{row['accuracy']:.2f} +- {ci:.2f}" if isinstance(ci, (int, float)) else f"{row['accuracy']:.2f}"
            ece = "" if row.get("ece") is None else f"{row['ece']:.2f}"
            steps = row.get("train_steps")
            time = f"{(row.get('train_seconds') or 0) / 60:.1f} min" + (f", {steps:,} steps" if steps else "")
            lines.append(f"| {method} | {ways}-way {shots}-shot | {'' if paper is None else paper} | {score} | "
                         f"{versus_paper(row, paper)} | {ece} | {row.get('device', '')} | {time} | "
                         f"{row.get('recipe', '')} |")
    if missing:
        lines += ["", "Not scored yet on 1,000 episodes, though a shipped recipe evaluates it: " + "; ".join(missing)
                  + "."]
    return "\n".join(lines)


def headline_section(rows: list[dict]) -> list[str]:
    """BENCHMARKS.md's first section (title, how to read it, table) as report.py's parts; [] without rows."""
    table = headline_table(rows)
    if not table:
        return []
    text = ("For each method and Omniglot setting, the best row of the accuracy table below by accuracy (1,000 "
            "test episodes or more), rows measured on a GPU preferred to CPU rows. \"vs paper\" is kshot's accuracy "
            "minus the paper's, in bold with \"below\" where the paper's figure lies above the whole 95% "
            "confidence interval. Most runs trained under a time budget (see train time, device and the "
            "recipe's row below), not the paper's full schedule, so a gap says how far the budget got.")
    return [f"## {TITLE}", "", text, "", table, ""]


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report

    report._load_section_writers()  # the rows write_report puts in the accuracy table: not other sections' files
    rows = [row for stem, stem_rows in report.load_rows().items() for row in stem_rows
            if isinstance(row, dict) and not any(stem.startswith(prefix) for prefix in report.SECTIONS)]
    print(headline_table(rows) or "no Omniglot rows at the four settings in benchmarks/results/")


if __name__ == "__main__":
    main()
