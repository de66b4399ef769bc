"""Recipe files and command-line options: malformed YAML, abusive aliases and ``extends:``, values the schema
must refuse, ``--set`` abuse, and option values the CLI must refuse at the door."""

from __future__ import annotations

from .harness import PICO, TINY, bad_recipe_file, case, recipe_with

BOMB = "\n".join(['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
                 + ["model: {name: *a9}", "data: {kind: synthetic}", "search: {target_flops_ratio: 0.5}"])
for _name, _content in [
    ("non-UTF-8 bytes", b"name: \xff\xfe\nmodel: {name: x}\n"),
    ("alias bomb used as a value", BOMB.encode()),
    ("recursive alias", b"a: &a [*a]\n"),
    ("2 MiB file", b"# " + b"x" * (2 << 20)),
    ("nesting 5000 deep", b"[" * 5000),
    ("empty file", b""),
    ("a list, not a mapping", b"- a\n- b\n"),
    ("python object tag", b"model: !!python/object/apply:os.system ['touch /tmp/pwned']\n"),
    ("two YAML documents", b"name: a\n---\nname: b\n"),
    ("tab indentation", b"model:\n\tname: x\n"),
    ("a duplicate key dropping a budget limit",
     b"budget: {max_gflops: 1.0}\nmodel: {name: x}\nbudget: {}\n"),
]:
    case("recipe", _name, 2)(lambda ws, n=_name, c=_content: bad_recipe_file(ws, n.replace(" ", "-"), c))

case("recipe", "unknown key (typo)", 2)(lambda ws: recipe_with(ws, "typo", search={**TINY["search"], "epocs": 3}))
case("recipe", "wrong type", 2)(lambda ws: recipe_with(ws, "type", search={**TINY["search"], "epochs": "many"}))
case("recipe", "NaN learning rate", 2)(lambda ws: recipe_with(ws, "nan", search={**TINY["search"], "lr": float("nan")}))
case("recipe", "infinite learning rate", 2)(
    lambda ws: recipe_with(ws, "inf", finetune={**TINY["finetune"], "lr": float("inf")}))
case("recipe", "NUL in the model name", 2)(lambda ws: recipe_with(ws, "nul", model={"name": "ofb\x00vit"}))
case("recipe", "negative seed", 2)(lambda ws: recipe_with(ws, "seed", seed=-1))
case("recipe", "budget that cannot be met", 2)(
    lambda ws: recipe_with(ws, "budget", search={**TINY["search"], "target_flops_ratio": 0.001}))


@case("recipe", "extends itself", 2)
def _extends_itself(ws):
    where = ws.new_dir("extends")
    (where / "r.yaml").write_text("extends: r.yaml\nname: x\n")
    return ws.cli("run", where / "r.yaml"), True, ""


@case("recipe", "extends a missing file", 2)
def _extends_missing(ws):
    where = ws.new_dir("extends-missing")
    (where / "r.yaml").write_text("extends: nowhere.yaml\nname: x\n")
    return ws.cli("run", where / "r.yaml"), True, ""


@case("recipe", "recipe path is a directory", 2)
def _recipe_dir(ws):
    return ws.cli("run", ws.new_dir("dir")), True, ""


@case("recipe", "--set without '='", 2)
def _set_no_eq(ws):
    where = ws.new_dir("set")
    return ws.cli("run", ws.recipe(where), "--set", "search.epochs"), not (where / "run").exists(), ""


@case("recipe", "--set into a value that is not a section", 2)
def _set_not_section(ws):
    where = ws.new_dir("set2")
    return ws.cli("run", ws.recipe(where), "--set", "model.name.x=1"), not (where / "run").exists(), ""


@case("recipe", "--set alias bomb", 2)
def _set_bomb(ws):
    where = ws.new_dir("set3")
    nested = "&b [" + ",".join(["*a"] * 10) + "]"
    value = f"[&a [1,1,1,1,1,1,1,1,1,1], {nested}, &c [{','.join(['*b'] * 10)}], &d [{','.join(['*c'] * 10)}], " \
            f"&e [{','.join(['*d'] * 10)}], [{','.join(['*e'] * 10)}]]"
    return ws.cli("run", ws.recipe(where), "--set", f"model.overrides.x={value}"), not (where / "run").exists(), ""


# -- CLI options ---------------------------------------------------------------------------------------------
for _name, _args in [
    ("export --opset 11", ["export", ".", "--opset", "11"]),
    ("profile --repeats 0", ["profile", ".", "--repeats", "0"]),
    ("lut build --batch 0", ["lut", "build", "--model", PICO, "--batch", "0"]),
    ("lut build --img-size 0", ["lut", "build", "--model", PICO, "--img-size", "0"]),
    ("profile --batch 0,1", ["profile", ".", "--batch", "0,1"]),
    ("profile --batch 1,x", ["profile", ".", "--batch", "1,x"]),
    ("export --batch-range 64,16,1", ["export", ".", "--batch-range", "64,16,1"]),
    ("selfcheck --trials -1", ["selfcheck", "--trials", "-1"]),
    ("unknown command", ["frobnicate"]),
    ("unknown option", ["run", "r.yaml", "--frobnicate"]),
    ("profile --backend ort-cuda on a CPU machine (lut build)", ["lut", "build", "--model", PICO, "--backend",
                                                                  "ort-cuda"]),
]:
    case("options", _name, 2)(lambda ws, a=_args: (ws.cli(*a), True, ""))
