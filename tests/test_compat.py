"""acm_d2.compat holds every private Detectron2/fvcore internal acm_d2 uses; these fail, naming the
internal, when an upgrade moves one or when new code reaches past compat.py.

The scan reads acm_d2/ and tools/ (compat.py aside) as syntax trees and reports:
- an attribute `x._name` (or getattr/hasattr/setattr/delattr(x, "_name")) where `_name` is private to
  Detectron2/fvcore: for `self`/`cls`/`super()` in a class, a private name of its Detectron2/fvcore
  bases (none for `self` in a class without them: its names are its own); for `super()` in a class
  without bases (a mixin) and for any other `x`, a private name Detectron2 or fvcore define anywhere;
- `from detectron2... import _name`;
- a class that replaces a private name of a Detectron2/fvcore base (its own method or attribute, or a
  mixin's) unless compat.OVERRIDDEN lists it. Bases are resolved by importing the module.
"""

import ast
import functools
import importlib
import importlib.util
import inspect
import pathlib
import textwrap

import detectron2
import fvcore
import pytest
from detectron2.engine import SimpleTrainer

from acm_d2 import compat

REPO = pathlib.Path(__file__).resolve().parents[1]
FOREIGN = ("detectron2", "fvcore")
REFLECTION = ("getattr", "hasattr", "setattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _foreign(cls: type) -> bool:
    return cls.__module__.split(".")[0] in FOREIGN


def _assigned(body: list) -> set:
    """The names a statement list binds itself: its functions, classes and plain assignments."""
    names = set()
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _defined_private_names(tree: ast.AST) -> set:
    """Private names a syntax tree defines: at module or class level, as any function or class, or as
    an attribute set on self or cls."""
    names = _assigned(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names |= _assigned(node.body)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {n for n in names if _private(n)}


@functools.lru_cache(maxsize=None)
def foreign_private_names() -> frozenset:
    """Every private name that Detectron2's or fvcore's source defines."""
    paths = [
        p for pkg in (detectron2, fvcore) for p in pathlib.Path(pkg.__file__).parent.rglob("*.py")
    ]
    return frozenset().union(*(_defined_private_names(ast.parse(p.read_text())) for p in paths))


@functools.lru_cache(maxsize=None)
def _class_private_names(cls: type) -> frozenset:
    """A Detectron2/fvcore class's private names: its attributes and those its methods set on self."""
    names = {n for n in vars(cls) if _private(n)}
    try:
        names |= _defined_private_names(ast.parse(textwrap.dedent(inspect.getsource(cls))))
    except (OSError, TypeError):  # no source (a C extension): its attributes are all there is
        pass
    return frozenset(names)


def _linearize(bases: list) -> list:
    """The method resolution order (C3) of a class with these bases, the class itself left out."""
    seqs = [list(b.__mro__) for b in bases] + [list(bases)]
    order = []
    while any(seqs):
        seqs = [s for s in seqs if s]
        head = next(s[0] for s in seqs if not any(s[0] in t[1:] for t in seqs))
        order.append(head)
        for s in seqs:
            if s[0] is head:
                del s[0]
    return order


class _Scan(ast.NodeVisitor):
    def __init__(self, namespace: dict, filename: str):
        self.namespace, self.filename = namespace, filename
        self.found = []  # messages
        self.listed = set()  # OVERRIDDEN entries (class, name) that this source overrides
        self.receivers = {}  # self/cls name in the method being read -> its class's foreign names
        self.super_names = frozenset()  # the foreign private names super() reaches in that class

    def report(self, node, message):
        self.found.append(f"{self.filename}:{node.lineno}: {message}")

    def resolve(self, expr, node):
        try:
            base = eval(ast.unparse(expr), dict(self.namespace))  # noqa: S307 (our own source)
        except Exception as error:
            self.report(node, f"cannot resolve base {ast.unparse(expr)} of {node.name} ({error})")
            return []
        if isinstance(base, type):
            return [base]
        return list(getattr(base, "__mro_entries__", lambda bases: ())((base,)))

    def visit_ClassDef(self, node):
        for expr in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(expr)
        bases = [b for expr in node.bases for b in self.resolve(expr, node)]
        mro = _linearize(bases)
        foreign = [k for k in mro if _foreign(k)]
        own = _assigned(node.body)
        for name in sorted({n for k in foreign for n in vars(k) if _private(n)}):
            base = next(k for k in foreign if name in vars(k))
            owner = None if name in own else next(k for k in mro if name in vars(k))
            if owner is not None and _foreign(owner):
                continue  # Detectron2's own
            listed = [(c, n) for c, n, _ in compat.OVERRIDDEN if n == name and c in foreign]
            if listed:
                self.listed.update(listed)
            else:
                by = node.name if owner is None else f"{node.name} (through {owner.__name__})"
                self.report(
                    node,
                    f"{by} overrides {base.__module__}.{base.__qualname__}.{name}: list it in "
                    "acm_d2.compat.OVERRIDDEN",
                )
        names = frozenset().union(*map(_class_private_names, foreign))
        # A mixin's super() reaches whatever class follows it, possibly Detectron2's.
        reach = foreign_private_names() if not bases else names
        saved = self.receivers, self.super_names
        for stmt in node.body:
            self.receivers, self.super_names = dict(saved[0]), reach
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.args.args:
                is_static = any(ast.unparse(d) == "staticmethod" for d in stmt.decorator_list)
                if not is_static:
                    self.receivers[stmt.args.args[0].arg] = names
            self.visit(stmt)
        self.receivers, self.super_names = saved

    def check_access(self, node, receiver, name):
        if not _private(name):
            return
        if isinstance(receiver, ast.Name) and receiver.id in self.receivers:
            private = self.receivers[receiver.id]
        elif (
            isinstance(receiver, ast.Call)
            and isinstance(receiver.func, ast.Name)
            and receiver.func.id == "super"
        ):
            private = self.super_names
        else:
            private = foreign_private_names()
        if name in private:
            self.report(
                node,
                f"{ast.unparse(node)} reaches a Detectron2/fvcore private name: go through acm_d2.compat",
            )

    def visit_Attribute(self, node):
        self.check_access(node, node.value, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node):
        func, args = node.func, node.args
        if isinstance(func, ast.Name) and func.id in REFLECTION and len(args) > 1:
            if isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
                self.check_access(node, args[0], args[1].value)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        if (node.module or "").split(".")[0] in FOREIGN:
            for alias in node.names:
                if _private(alias.name):
                    self.report(
                        node, f"imports {node.module}.{alias.name}: go through acm_d2.compat"
                    )


def private_uses(source: str, namespace: dict, filename: str = "<snippet>"):
    """(messages, listed overrides used) for one module's source; `namespace` is its globals."""
    scan = _Scan(namespace, filename)
    scan.visit(ast.parse(source))
    return scan.found, scan.listed


def _module_namespace(path: pathlib.Path, tree: ast.AST) -> dict:
    """The globals of the module at `path`, imported only when it defines classes (to resolve bases)."""
    if not any(isinstance(n, ast.ClassDef) for n in ast.walk(tree)):
        return {}
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "acm_d2":
        return vars(importlib.import_module(".".join(p for p in parts if p != "__init__")))
    spec = importlib.util.spec_from_file_location(f"_scanned_{parts[-1]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a tool: its main() runs only under __main__
    return vars(module)


def _scan_snippet(source: str):
    source = textwrap.dedent(source)
    namespace = {"__name__": "snippet"}
    exec(compile(source, "<snippet>", "exec"), namespace)  # noqa: S102 (the test's own text)
    return private_uses(source, namespace)


def test_every_private_internal_still_exists():
    assert compat.check() == []


def test_no_private_detectron2_access_or_override_outside_compat():
    found, listed = [], set()
    for path in sorted([*REPO.glob("acm_d2/**/*.py"), *REPO.glob("tools/*.py")]):
        if path.name == "compat.py":
            continue
        source = path.read_text()
        namespace = _module_namespace(path, ast.parse(source))
        messages, overrides = private_uses(source, namespace, str(path.relative_to(REPO)))
        found += messages
        listed |= overrides
    assert found == []
    # Every OVERRIDDEN entry is still overridden somewhere (a stale entry would hide nothing, but lie).
    assert {(c, n) for c, n, _ in compat.OVERRIDDEN} == listed


@pytest.mark.parametrize(
    "source, expected",
    [
        (  # an override compat does not list
            """
            from detectron2.data import DatasetMapper
            class Mapper(DatasetMapper):
                def _transform_annotations(self, *args):
                    pass
            """,
            "Mapper overrides detectron2.data.dataset_mapper.DatasetMapper._transform_annotations",
        ),
        (  # the same, through a mixin
            """
            from detectron2.data import DatasetMapper
            class Mixin:
                def _transform_annotations(self, *args):
                    pass
            class Mapper(Mixin, DatasetMapper):
                pass
            """,
            "Mapper (through Mixin) overrides",
        ),
        (  # a private attribute Detectron2 sets on self
            """
            from detectron2.engine import DefaultTrainer
            class Trainer(DefaultTrainer):
                def after_train(self):
                    return len(self._hooks)
            """,
            "self._hooks reaches",
        ),
        (  # Detectron2's version of a listed override, called past compat.call_overridden
            """
            from detectron2.checkpoint import DetectionCheckpointer
            class Checkpointer(DetectionCheckpointer):
                def _load_file(self, filename):
                    return super()._load_file(filename)
            """,
            "super()._load_file reaches",
        ),
        (  # the same from a mixin, whose super() may be Detectron2's
            """
            class StopOnNaN:
                def _write_metrics(self, *args):
                    return super()._write_metrics(*args)
            """,
            "super()._write_metrics reaches",
        ),
        ("def ap(trainer):\n    return trainer._last_eval_results", "trainer._last_eval_results"),
        ("def ap(trainer):\n    return getattr(trainer, '_last_eval_results')", "getattr(trainer"),
        (
            "from detectron2.data import build\nf = build._train_loader_from_config",
            "build._train_loader_from_config reaches",
        ),
        (
            "from detectron2.data.build import _train_loader_from_config",
            "imports detectron2.data.build._train_loader_from_config",
        ),
    ],
)
def test_scan_catches_a_new_private_access_or_override(source, expected):
    found, _ = _scan_snippet(source)
    assert len(found) == 1 and expected in found[0], found


def test_scan_passes_listed_overrides_and_own_private_names():
    found, listed = _scan_snippet(
        """
        from detectron2.engine import DefaultTrainer
        from detectron2.modeling.roi_heads import Res5ROIHeads
        class Heads(Res5ROIHeads):
            @classmethod
            def _build_res5_block(cls, cfg):
                return None, 0
        class Trainer(DefaultTrainer):
            def _remember(self):
                self._mine = 1
                return self._mine
        class Own:
            def __init__(self):
                self._hooks = []  # not a Detectron2 class: its own name
        """
    )
    assert found == []
    assert {n for _, n in listed} == {"_build_res5_block"}


def test_call_overridden_refuses_an_unlisted_private_method():
    trainer = SimpleTrainer.__new__(SimpleTrainer)
    with pytest.raises(ValueError, match="not in acm_d2.compat.OVERRIDDEN"):
        compat.call_overridden(object, trainer, "_private_nobody_listed")
