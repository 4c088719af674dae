"""The wings' dependency rule: tools, detection -> train -> models, evaluators -> attention,
data -> the plumbing at the top of halonet/. A module imports only its own wing and the wings
below it (docs/layout.md), so a wing can be read, tested and reused without the ones above it."""

import ast
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What each wing may import besides itself; 'plumbing' is halonet/'s own top-level modules.
MAY_IMPORT = {
  'plumbing': set(),
  'attention': {'plumbing'},
  'data': {'plumbing'},
  'models': {'plumbing', 'attention'},
  'evaluators': {'plumbing', 'data'},
  'train': {'plumbing', 'attention', 'data', 'models', 'evaluators'},
  'tools': {'plumbing', 'attention', 'data', 'models', 'evaluators', 'train'},
  'detection': {'plumbing', 'attention', 'data', 'models', 'evaluators', 'train'},
}


def _wing(module: str) -> str:
  """'halonet.models.mixers.sasa' -> 'models'; 'halonet.paths' -> 'plumbing'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else 'plumbing'


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, module) of every halonet module a file imports, function-level imports included."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if a.name.startswith('halonet')]
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('halonet'):
      # `from halonet import models` names a wing: the name imported is the module.
      found += [
        (node.lineno, f'{node.module}.{a.name}' if node.module == 'halonet' else node.module)
        for a in node.names
      ]
  return found


def violations(package: pathlib.Path) -> list[str]:
  """'file:line: wing imports module (wing)' for every import against the rule."""
  found = []
  for path in sorted(package.rglob('*.py')):
    module = '.'.join(path.relative_to(package.parent).with_suffix('').parts)
    wing = _wing(module)
    for line, target in _imported(ast.parse(path.read_text())):
      other = _wing(target)
      if other != wing and other not in MAY_IMPORT[wing]:
        where = path.relative_to(package.parent)
        found.append(f'{where}:{line}: {wing} imports {target} ({other})')
  return found


def test_every_wing_imports_only_itself_and_the_wings_below_it():
  assert violations(ROOT / 'halonet') == []


def test_the_plumbing_stays_small():
  """halonet/'s top holds the plumbing alone; everything else lives in a wing."""
  top = sorted(p.name for p in (ROOT / 'halonet').glob('*.py') if p.name != '__init__.py')
  assert len(top) <= 8, top


def test_an_upward_import_is_found(tmp_path):
  """Planted in a copy: the check is no rubber stamp (and function-level imports count)."""
  copy = tmp_path / 'halonet'
  shutil.copytree(ROOT / 'halonet', copy, ignore=shutil.ignore_patterns('__pycache__'))
  layer = copy / 'attention' / 'layer.py'
  layer.write_text(layer.read_text() + '\n\ndef f():\n  from halonet.train import loop\n')
  paths = copy / 'paths.py'
  paths.write_text(paths.read_text() + '\nfrom halonet import data\n')
  sasa = copy / 'models' / 'mixers' / 'sasa.py'
  sasa.write_text(sasa.read_text() + '\nimport halonet.tools.trained\n')
  found = violations(copy)
  assert len(found) == 3, found
  assert any(f.startswith('halonet/attention/layer.py') and '(train)' in f for f in found)
  assert any(f.startswith('halonet/paths.py') and '(data)' in f for f in found)
  assert any(f.startswith('halonet/models/mixers/sasa.py') and '(tools)' in f for f in found)


def test_every_test_module_has_a_basename_of_its_own():
  """pytest imports test files by basename (the test folders are not packages): a second
  test_x.py anywhere under tests/ stops the other from being collected."""
  names = [path.name for path in (ROOT / 'tests').rglob('test_*.py')]
  assert sorted({n for n in names if names.count(n) > 1}) == []
