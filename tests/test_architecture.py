"""The package's shape: no import cycles (type-only imports included), modules
of a readable size, every option reaching every face, and each option group
flowing whole from the HTTP layer and the command line to the native request."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slot_cpp

PACKAGE = Path(slot_cpp.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = ("slot_cpp",) + rel.parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (functions and
    TYPE_CHECKING blocks included: a type-only circle is a circle too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "slot_cpp":
                found.add(t)
    return found


def test_the_module_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Depth-first search for a back edge; report the cycle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("b_source", [
    "def f():\n    from .a import x\n",  # an import inside a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n",  # a type-only import
], ids=["runtime", "type-only"])
def test_the_cycle_check_finds_a_planted_cycle(tmp_path, monkeypatch, b_source):
    # The same search on a package with a -> b -> a fails.
    pkg = tmp_path / "slot_cpp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text(b_source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_the_module_graph_has_no_cycle()


# ---- sizes -------------------------------------------------------------------------------

PYTHON_MAX_LINES = 800
CPP_MAX_LINES = 900
CPP = Path(__file__).resolve().parents[1] / "cpp"  # the checkout's sources, whichever way the package is installed


def _too_long(paths, limit: int) -> list[str]:
    out = []
    for path in paths:
        n = len(path.read_text(errors="replace").splitlines())
        if n > limit:
            out.append(f"{path.name}: {n} lines")
    return out


def test_no_python_module_is_over_800_lines():
    assert not _too_long(sorted(PACKAGE.rglob("*.py")), PYTHON_MAX_LINES)


def test_no_cpp_file_is_over_900_lines():
    files = sorted(p for p in CPP.rglob("*") if p.suffix in (".cpp", ".h", ".hpp", ".cc", ".cu", ".cuh"))
    assert files, f"no C++ sources under {CPP}"
    assert not _too_long(files, CPP_MAX_LINES)


def test_every_module_imports_alone():
    # Each module in a fresh interpreter, so that import order cannot hide a cycle.
    names = [n for n in _modules() if not n.endswith("__main__")]
    for name in names:
        code = f"import importlib; importlib.import_module({name!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"


# ---- every option reaches every face -------------------------------------------------

from slot_cpp import _generation  # noqa: E402
from slot_cpp import options as opts  # noqa: E402
from slot_cpp.cli import build_parser  # noqa: E402


def _other_value(name: str, default, spec):
    """A valid value other than the default, to see it arrive."""
    if spec.kind == "bool":
        return not default
    if spec.kind == "str":
        return next(c for c in spec.choices if c != default)
    if spec.kind == "lr":
        return 0.03
    if spec.kind == "int":
        base = int(spec.low) if default is None else int(default)
        return max(base + 1, int(spec.low or 0) + 1)
    if spec.kind == "float":
        if default is None or default == 0:
            return 0.5 if spec.high is None or spec.high >= 0.5 else spec.high / 2
        return default / 2
    if spec.kind == "strings":
        return ("###",)
    if spec.kind == "bias":
        return ((1, 5.0),)
    if spec.kind == "grammar":
        return 'root ::= "a" [b-z]*'
    if spec.kind == "schema":
        return '{"type": "object"}'
    if spec.kind == "text":
        return "abc"
    if spec.kind == "lora":
        return ()  # every adapter at 0 (the tiny model has none)
    if spec.kind == "kv":
        return (("general.name", "str", "renamed"),)
    if spec.kind == "json":
        return '{"enable_thinking": false}'
    raise AssertionError(spec.kind)


def _walk(groups):
    for group in groups:
        for name, default, spec in opts.specs(group):
            if spec.kind != "object":
                yield group, name, default, spec


GENERATE_GROUPS = (opts.SamplingOptions, opts.SlotOptions, opts.RequestExtras)


@pytest.mark.parametrize("group, name, default, spec", list(_walk(GENERATE_GROUPS)),
                         ids=lambda v: getattr(v, "__name__", v) if not isinstance(v, opts.OptionSpec) else "")
def test_every_generate_option_reaches_the_native_request(tiny_model, group, name, default, spec):
    value = _other_value(name, default, spec)
    groups = _generation.groups_of({name: value}, None, None, where="test")
    got = next(g for g in groups if isinstance(g, group))
    assert getattr(got, name) == value
    ids = tiny_model.tokenize("one two three four")
    request = _generation.build_request(tiny_model, ids, 1, groups, None)
    if spec.native is not None:
        assert getattr(request, spec.native or name) == pytest.approx(value)
    elif name == "lr":
        assert request.lr == pytest.approx(value) and not request.auto_lr
    elif name == "stop":
        assert list(request.stop) == list(value)
    elif name in ("seed", "memory_budget"):
        assert getattr(request, name) == value
    elif name == "logit_bias":
        assert [tuple(p) for p in request.logit_bias] == list(value)
    elif name == "loss_window":
        assert list(request.loss_mask) == [t >= len(ids) - 1 - value for t in range(len(ids) - 1)]
    elif name == "grammar":
        assert request.grammar == value
    elif name == "json_schema":
        assert request.json_schema == value and not request.grammar  # converted by the C++ core
    elif name == "loss_on":
        pass  # turned into a mask from the chat messages: tests/test_smollm2.py
    elif name == "lora":
        assert list(request.lora_scales) == []  # one scale per adapter: tests/test_lora_requests.py
    else:
        raise AssertionError(f"{name} is converted by hand but this test does not know how")
    # And the Python API takes it as a keyword (a real, one-token call).
    if name == "prompt_logprobs":  # taken before SLOT would learn: plain generation
        tiny_model.generate("one two three four", max_tokens=1, prompt_logprobs=True)
    elif name not in ("loss_on", "stop"):
        tiny_model.generate_with_slot("one two three four", **{"max_tokens": 1, name: value})


# Which command shows each group's flags (with the command's own defaults where it documents another one).
CLI = {
    opts.SamplingOptions: (["generate", "x"], {}),
    opts.SlotOptions: (["generate", "x"], {}),
    opts.RtdOptions: (["generate", "x"], {}),
    opts.QAlignOptions: (["qalign", "x", "--reward", "judge"], {}),
    opts.LmcorOptions: (["lmcor", "correct", "x", "--corrector", "c.gguf"], {}),
    opts.ModelSettings: (["generate", "x"], {}),
    opts.ChatOptions: (["generate", "x"], {}),
    opts.ServerSettings: (["serve"], {}),
}


@pytest.mark.parametrize("group", list(CLI), ids=lambda g: g.__name__)
def test_every_option_is_a_flag_with_its_default(group, tmp_path):
    argv, _ = CLI[group]
    parser = build_parser()
    dest_prefix = "rtd_" if group is opts.RtdOptions else ""
    seen = 0
    for name, default, spec in opts.specs(group):
        flag = opts.flag_of(name, spec)
        if flag is None:
            continue
        seen += 1
        args = parser.parse_args(argv)
        got = opts.from_arguments(args, group, dest_prefix=dest_prefix)
        expected = list(default) if spec.kind == "strings" else default
        if group is opts.ServerSettings and name == "api_key":
            expected = os.environ.get("SLOT_CPP_API_KEY")  # the command line's default
        assert got[name] == expected, (group.__name__, name)
        value = _other_value(name, default, spec)
        if spec.kind == "bool":
            extra = [flag if value else "--no-" + flag[2:]]
        elif spec.kind == "strings":
            extra = [flag, value[0]]
        elif spec.kind == "bias":
            extra = [flag, f"{value[0][0]}={value[0][1]}"]
        elif spec.kind in ("grammar", "schema"):  # read from a file
            path = tmp_path / name
            path.write_text(value)
            extra = [flag, str(path)]
        elif spec.kind == "kv":
            extra = [flag, "=".join(value[0][:1]) + "=" + ":".join(value[0][1:])]
        else:
            extra = [flag, str(value)]
        args = parser.parse_args(argv[:1 + (argv[0] == "lmcor")] + extra + argv[1 + (argv[0] == "lmcor"):])
        got = opts.from_arguments(args, group, dest_prefix=dest_prefix)
        if spec.kind == "kv":  # the flag's KEY=TYPE:VALUE text, read by the option's own check
            got[name] = spec.check(name, got[name])
        assert got[name] == (list(value) if spec.kind in ("strings", "bias") else value), (group.__name__, name)
    assert seen > 0


HTTP = {
    opts.SamplingOptions: lambda p: p.CompletionRequest,
    opts.SlotOptions: lambda p: p.SlotOptions,
    opts.RtdOptions: lambda p: p.RtdOptions,
    opts.QAlignOptions: lambda p: p.QAlignOptions,
    opts.LmcorOptions: lambda p: p.LmcorOptions,
    opts.RequestExtras: lambda p: p.CompletionRequest,
    opts.ChatOptions: lambda p: p.ChatCompletionRequest,
}


@pytest.mark.parametrize("group", list(HTTP), ids=lambda g: g.__name__)
def test_every_option_is_in_the_server_schema_with_its_default(group):
    from slot_cpp.server import protocol

    model = HTTP[group](protocol)
    schema = model.model_json_schema()
    seen = 0
    for name, default, spec in opts.specs(group):
        if spec.http is None:
            continue
        seen += 1
        key = spec.http or name
        assert key in schema["properties"], (group.__name__, key)
        assert model.model_fields[name].default == opts.http_default(name, default, spec), (group.__name__, name)
        if spec.kind in ("int", "float") and spec.low is not None:
            prop = schema["properties"][key]
            bound = prop.get("anyOf", [prop])[0]
            assert bound.get("exclusiveMinimum" if spec.low_open else "minimum") == spec.low, (group.__name__, name)
    assert seen > 0


# ---- option groups flow whole ---------------------------------------------------------


class _Flow:
    """Records the groups that reach ``options.native_request`` and counts the
    group objects made (a regrouping would make another)."""

    def __init__(self, monkeypatch):
        from slot_cpp.options import spec

        self.received: list[tuple] = []
        self.made: dict[type, int] = {}
        real_native = opts.native_request
        real_post_init = spec._Group.__post_init__

        def native_request(tokens, n, sampling, slot, extras, *args, **kwargs):
            self.received.append((sampling, slot, extras))
            return real_native(tokens, n, sampling, slot, extras, *args, **kwargs)

        def post_init(group):
            self.made[type(group)] = self.made.get(type(group), 0) + 1
            real_post_init(group)

        monkeypatch.setattr(opts, "native_request", native_request)
        monkeypatch.setattr(spec._Group, "__post_init__", post_init)

    def one_request(self) -> tuple:
        assert len(self.received) == 1, self.received
        return self.received[0]


def _returns(monkeypatch, module, name: str) -> list:
    """What ``module.name`` returns from now on, call by call."""
    out: list = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        out.append(real(*args, **kwargs))
        return out[-1]

    monkeypatch.setattr(module, name, wrapper)
    return out


def test_an_http_option_reaches_the_native_request_in_its_group_object(tiny_model, monkeypatch):
    from fastapi.testclient import TestClient

    from slot_cpp.server import ServerConfig, create_app, routes

    app = create_app(tiny_model, ServerConfig(model_id="tiny"))
    jobs = _returns(monkeypatch, routes, "resolve")
    flow = _Flow(monkeypatch)
    body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 1, "temperature": 0.5,
            "slot": {"steps": 1, "lr": 0.01, "loss_on": "last"}}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    sampling, slot, extras = flow.one_request()
    (job,) = jobs
    # The very objects the HTTP layer built, one per group, unchanged on the way.
    assert sampling is job.sampling and slot is job.slot and extras is job.extras
    assert slot.loss_on == "last" and slot.steps == 1 and sampling.temperature == 0.5
    assert flow.made == {opts.SamplingOptions: 1, opts.SlotOptions: 1, opts.RequestExtras: 1}


def test_a_cli_flag_reaches_the_native_request_in_its_group_object(tiny_path, monkeypatch, capsys):
    from slot_cpp.cli import _common, main

    built = _returns(monkeypatch, _common, "group_from_arguments")
    flow = _Flow(monkeypatch)
    code = main(["generate", "one two three four", "--model", str(tiny_path), "--n-ctx", "256", "--threads", "1",
                 "--max-tokens", "1", "--temperature", "0.5", "--steps", "1", "--loss-on", "last", "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    sampling, slot, extras = flow.one_request()
    by_type = {type(g): g for g in built}
    assert sampling is by_type[opts.SamplingOptions] and slot is by_type[opts.SlotOptions]
    assert slot.loss_on == "last" and slot.steps == 1 and sampling.temperature == 0.5
    assert flow.made[opts.SamplingOptions] == flow.made[opts.SlotOptions] == flow.made[opts.RequestExtras] == 1


def test_model_and_server_settings_have_one_definition():
    # Model(...)'s keyword defaults are ModelSettings' (serve's flags and the
    # CLI's model flags are made from it), and the server's configuration is ServerSettings.
    from slot_cpp import Model
    from slot_cpp.server import ServerConfig

    params = inspect.signature(Model).parameters
    for name, default, _ in opts.specs(opts.ModelSettings):
        assert name in params and params[name].default == default, name
    assert ServerConfig is opts.ServerSettings
