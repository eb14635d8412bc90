"""The docs cannot drift from conf/ and the code: option tables, config groups, node-config keys, links.

Every option named in an option table of README.md or docs/*.md (a table whose first header cell is
`option`) must exist in conf/ composed with Hydra (with the group choice that has it, e.g.
`method.proximal_mu` under method=fedprox), and every key of conf/ must be named in one of those
tables, so renaming an option without its docs fails here (`test_a_renamed_option_is_caught` shows
it on a copy of conf/). Defaults given as plain values are checked too. The node-config table of
docs/deployment.md must list exactly the keys `client_app/node.py` accepts, and every
`--node-config "..."` example may only use them. Lists of config groups and the README's methods
table follow conf/'s files; relative links point at files and headings that exist; docs/README.md links every page, and
the README fits one screen.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from client_app.node import NODE_CONFIG_KEYS
from common.config import CONF_DIR, compose_config

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GROUPS = ("dataset", "model", "training", "strategy", "method")
STRUCTURAL = {"method._target_", "method.name"}  # set by the choice `method=NAME`, not options of their own
SIMULATION_NODE_KEYS = {"partition-id", "num-partitions"}  # set by Flower's simulation, never by a user


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; a `|` inside backticks (`a|b`) does not split."""
    cells, cell, code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            code = not code
        if char == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of a page: its header row, then its body rows (the --- row left out)."""
    found, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            row = split_row(line)
            if not all(re.fullmatch(r":?-+:?", c) for c in row):
                current.append(row)
        elif current:
            found.append(current)
            current = []
    return found


def option_rows(text: str) -> list[tuple[list[str], str]]:
    """(options, default cell) of each body row of the page's option tables. A name without a dot after
    the first one of its cell is relative to the first's parent: `strategy.dp.clip_norm_lr` from
    "`strategy.dp.target_clipped_quantile`, `clip_norm_lr`"."""
    rows = []
    for table in tables(text):
        if table[0][0].lower() != "option":
            continue
        for row in table[1:]:
            names = re.findall(r"`([^`]+)`", row[0])
            parent = names[0].rpartition(".")[0] if names else ""
            rows.append(
                (
                    [names[0], *(n if "." in n or not parent else f"{parent}.{n}" for n in names[1:])] if names else [],
                    row[1] if len(row) > 1 else "",
                )
            )
    return rows


def documented(pages: list[Path] = DOCS) -> dict[str, list[tuple[str, str]]]:
    """Option name -> [(page, default cell)] over every option table of README.md and docs/."""
    options: dict[str, list[tuple[str, str]]] = {}
    for page in pages:
        for names, default in option_rows(page.read_text()):
            cells = split_top_level(default)
            for i, name in enumerate(names):
                options.setdefault(name, []).append((page.name, cells[i] if len(cells) == len(names) else ""))
    return options


def split_top_level(cell: str) -> list[str]:
    """A default cell's values, one per option of its row: split on commas outside brackets and parentheses."""
    parts, part, depth = [], "", 0
    for char in re.sub(r"\s*\([^)]*\)", "", cell):  # "(all cores)"-style remarks are not values
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(part.strip())
            part = ""
        else:
            part += char
    return [*parts, part.strip()]


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf (lists are leaves), interpolations and ??? left as written."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_keys(conf_dir: Path = CONF_DIR) -> tuple[dict[str, object], set[str], set[str]]:
    """The default configuration's leaves, then the leaves and the inner keys (`method`, `strategy.dp`) of
    every composition: the default and each group choice (`method=fedprox`, `dataset=pacs`, ...)."""
    default = OmegaConf.to_container(compose_config([], conf_dir), resolve=False)
    all_leaves, inner = set(leaves(default)), nodes(default)
    for group in GROUPS:
        for option in sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.startswith("_")):
            composed = OmegaConf.to_container(compose_config([f"{group}={option}"], conf_dir), resolve=False)
            all_leaves |= set(leaves(composed))
            inner |= nodes(composed)
    return leaves(default), all_leaves, inner


def nodes(node: object, prefix: str = "") -> set[str]:
    """Dotted names of the inner keys (a group like `method`, or `strategy.dp`)."""
    if not isinstance(node, dict):
        return set()
    found = {prefix[:-1]} if prefix else set()
    for key, value in node.items():
        found |= nodes(value, f"{prefix}{key}.")
    return found


def problems(
    options: dict[str, list[tuple[str, str]]], default: dict[str, object], all_leaves: set[str], inner: set[str]
) -> list[str]:
    """What the option tables and conf/ disagree on, one line each. A `prefix.*` row names a whole subtree."""
    found = [
        f"{page}: option `{name}` is not in conf/ (renamed or removed?)"
        for name, where in sorted(options.items())
        for page, _ in where
        if not (name[:-2] in inner if name.endswith(".*") else name in all_leaves | inner)
    ]
    subtrees = tuple(name[:-1] for name in options if name.endswith(".*"))
    found += [
        f"conf/ key `{key}` is in no option table of README.md or docs/ (docs/configuration.md is the reference)"
        for key in sorted(all_leaves - STRUCTURAL)
        if key not in options and not key.startswith(subtrees)
    ]
    for name, where in sorted(options.items()):
        for page, cell in where:
            if name in default and (wrong := default_mismatch(cell, default[name])) is not None:
                found.append(f"{page}: `{name}` documented with default {wrong}, conf/ has {default[name]!r}")
    return found


def default_mismatch(cell: str, value: object) -> str | None:
    """The documented default when it is a plain value that differs from conf/'s; None when equal or prose."""
    text = cell.strip()
    quoted = re.fullmatch(r"`([^`]*)`", text)
    raw = quoted.group(1) if quoted else text
    if value is None or isinstance(value, bool):
        expect = {None: "null", True: "true", False: "false"}[value]
        return None if raw not in ("null", "true", "false") or raw == expect else raw
    if isinstance(value, (int, float)):
        try:
            return None if float(raw.replace(",", "")) == float(value) else raw
        except ValueError:
            return None  # prose, or 2^22
    if isinstance(value, list):
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            return None
        return None if not isinstance(parsed, list) or parsed == value else raw
    return raw if quoted and raw != str(value) else None


@pytest.fixture(scope="module")
def conf() -> tuple[dict[str, object], set[str], set[str]]:
    return config_keys()


def test_option_tables_match_conf(conf):
    assert problems(documented(), *conf) == []


def test_a_renamed_option_is_caught(tmp_path):
    """Renaming strategy.max_norm_ratio in conf/ alone fails both ways: the old name is documented, the new is not."""
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    strategy = tmp_path / "conf" / "strategy" / "fedclip.yaml"
    strategy.write_text(strategy.read_text().replace("\nmax_norm_ratio:", "\nmax_update_ratio:"))
    default = OmegaConf.to_container(compose_config([], tmp_path / "conf"), resolve=False)
    found = problems(documented(), leaves(default), set(leaves(default)), nodes(default))
    assert any("`strategy.max_norm_ratio` is not in conf/" in p for p in found)
    assert any("`strategy.max_update_ratio` is in no option table" in p for p in found)


def test_a_wrong_default_is_caught():
    assert default_mismatch("`reject`", "clip") == "reject"
    assert default_mismatch("40", 20) == "40"
    assert default_mismatch("`null`", None) is None and default_mismatch("`true`", None) == "true"
    assert split_top_level("`null` (all cores)") == ["`null`"] and split_top_level("`[0.6,0.2,0.2]`, 1") == [
        "`[0.6,0.2,0.2]`",
        "1",
    ]
    assert default_mismatch("the 4 demo styles", ["photo"]) is None  # prose is not checked
    assert problems(
        {"training.rounds": [("x.md", "20")]}, {"training.rounds": 40}, {"training.rounds"}, {"training"}
    ) == ["x.md: `training.rounds` documented with default 20, conf/ has 40"]


def test_node_config_table_lists_exactly_the_keys_the_code_takes():
    """docs/deployment.md's node-config table (first header cell `key`) against client_app/node.py."""
    rows = [t for t in tables((REPO / "docs" / "deployment.md").read_text()) if t[0][0] == "key"]
    assert len(rows) == 1, "docs/deployment.md should hold one node-config table (first header cell `key`)"
    table = {re.findall(r"`([^`]+)`", row[0])[0] for row in rows[0][1:]}
    assert table == NODE_CONFIG_KEYS - SIMULATION_NODE_KEYS


def test_node_config_examples_use_known_keys():
    """Every `--node-config "..."` in README.md, docs/ and docker/compose.yml names keys node.py accepts."""
    pages = [*DOCS, REPO / "docker" / "compose.yml"]
    examples = [(p.name, m) for p in pages for m in re.findall(r"--node-config[= ](\"[^\"]*\"|[^\n]*)", p.read_text())]
    assert examples, "no --node-config example found"
    for page, example in examples:
        for key in re.findall(r"(?:^|[\s\"])([a-z][a-z-]*)=", example):
            assert key in NODE_CONFIG_KEYS - SIMULATION_NODE_KEYS, (
                f"{page}: --node-config key {key!r} is not one node.py takes"
            )


def test_config_group_lists_follow_conf():
    """ "`dataset/` (`demo`, `folder`, ...)" in docs/configuration.md names exactly conf/dataset/'s files."""
    for page in (REPO / "docs" / "configuration.md",):
        lists = dict(re.findall(r"`(\w+)/` \(([^)]*)\)", page.read_text()))
        assert set(lists) >= {"dataset", "model", "training", "strategy"}, page.name
        for group, names in lists.items():
            on_disk = {p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_")}
            if "`" in names:
                assert set(re.findall(r"`([^`]+)`", names)) == on_disk, f"{page.name}: {group}/ list"


def test_methods_table_follows_conf():
    table = next(t for t in tables((REPO / "docs" / "methods.md").read_text()) if t[0][0] == "`method=`")
    assert {re.findall(r"`([^`]+)`", row[0])[0] for row in table[1:]} == {
        p.stem for p in (CONF_DIR / "method").glob("*.yaml")
    }


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_resolve():
    """[text](docs/x.md#anchor): the file exists and has that heading."""
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to missing {path}"
            if anchor and file.suffix == ".md":
                headings = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in headings, f"{page.name}: link to {target}: no such heading in {file.name}"


def log_formats() -> list[str]:
    """Every format string the app logs with (`log.warning("node %d (%s) lost: %s", ...)`), as a regex."""
    formats = []
    for source in sorted(REPO.glob("*_app/**/*.py")) + sorted((REPO / "common").glob("**/*.py")):
        for call in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "log"
                and call.args
                and isinstance(call.args[0], ast.Constant)
            ):
                parts = [
                    re.escape(p) for p in re.split(r"%[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]", str(call.args[0].value))
                ]
                if not parts[0]:  # a format that starts with a value could be any line
                    continue
                if len(parts) > 1 and not parts[-1]:  # a value that ends the line may hold spaces (a reason, an error)
                    parts[-2:] = [parts[-2] + ".*"]
                formats.append(r"\S+".join(parts))
    return formats


def test_quoted_log_lines_are_what_the_code_prints():
    """A log line quoted in README.md or docs/ (`node 12 (cartoon) lost: ...`, `round 3: ...`) is the start of a line
    one of the app's log formats prints: values may be shortened (`5150...`, `...`), the quote may stop early, but
    its words must be the code's. (It cannot tell which of two formats a situation prints.)"""
    import regex  # transformers' dependency: partial matching, so a quote may stop early

    formats = log_formats()
    assert any("lost:" in f for f in formats)
    for page in DOCS:
        for quote in re.findall(r"`((?:node|round) [^`]*)`", page.read_text()):
            quote = " ".join(quote.split())
            if re.search(r"\d|\.\.\.", quote):  # a line with values, not a name like `round 0`
                assert any(regex.fullmatch(f, quote, partial=True) for f in formats), (
                    f"{page.name}: {quote!r} is not a line the app logs"
                )


def test_every_page_is_in_the_index_and_the_readme_fits_a_screen():
    """docs/README.md links every page of docs/; the README stays a first screen (at most 120 lines), the rest in
    docs/."""
    index = (REPO / "docs" / "README.md").read_text()
    linked = {target.partition("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", index)}
    assert {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"} <= linked
    assert len((REPO / "README.md").read_text().splitlines()) <= 120
