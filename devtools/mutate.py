"""Mutation testing: plant one small bug at a time in a module, run the fast tests that cover it,
and count the bugs they miss. A tool to run by hand, not part of CI (a module takes minutes).

The bugs are those a developer writes: an operator or comparison swapped (+/-, * and /, < and
<=, == and !=, in and not in, and/or), a negation dropped, a constant changed (n -> n + 1,
x -> 2x, True <-> False), a condition dropped (`if c:` -> `if True:` / `if False:`), a keyword
argument dropped (its default taken), two positional arguments swapped, a call statement or an
augmented assignment deleted. Docstrings, f-strings, annotations and `raise` statements (error
messages) are left alone. Each mutant runs in a copy of the repository, so the working tree is
never touched.

Usage: python devtools/mutate.py [MODULE ...] [--jobs N] [--list] [--survivors] [--rescore]
                              [--sample K]
  MODULE: keys of COVERING (e.g. halonet/train/optim.py); none = all. --list prints the mutants
  only.
  --survivors reruns only the mutants that survived the module's last run (after new tests);
  the others keep their outcome. --rescore only reapplies equivalent.json to the last report.
  --sample K runs K mutants drawn at random (seed 0) where a
  module's tests are too slow for all: the score is then an estimate, and the report says so.
Writes devtools/mutation/MODULE.json (score and survivors) and prints a table. Survivors judged
equivalent (no test could tell them apart) are listed with the reason in devtools/mutation/
equivalent.json and leave the score's denominator.
"""

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'devtools' / 'mutation'
# The input pipeline's tests (RandAugment's own are tests/data/test_randaugment.py).
_PIPELINE_TESTS = ('tests/data/test_input_pipeline.py',)
_MODEL_TESTS = (
  'tests/models/test_model.py::test_variant_params_match_paper',
  'tests/models/test_model.py::test_paper_configs_resolve_auto_per_backend',
  'tests/models/test_model.py::test_explicit_choices_and_cpu_configs_are_kept_on_every_backend',
  'tests/models/test_model.py::test_bfloat16_compute_keeps_float32_params',
  'tests/models/test_model.py::test_bad_values_fail_with_one_line',
  'tests/attention/test_pallas.py::test_refused_on_gpu_in_one_line',
  'tests/models/test_model.py::test_a_timm_arch_is_built_as_timms_network_with_the_runs_settings',
  'tests/models/test_model.py::test_measured_forms_reach_the_layers_in_one_plan_over_the_hosts_rule',
)
# Each module's fast tests: the ones that exercise it without end-to-end runs.
COVERING = {
  'halonet/train/optim.py': (
    'tests/train/test_optim.py',
    'tests/train/test_training_semantics.py::test_learning_rate_schedule_values',
    'tests/train/test_training_semantics.py::test_first_update_applies_the_peak_rate_and_decays_only_weights',
  ),
  'halonet/train/config_checks.py': ('tests/train/test_config_checks.py',),
  'halonet/sharding.py': ('tests/test_sharding.py',),
  'halonet/storage.py': ('tests/test_storage.py',),
  'halonet/paths.py': ('tests/test_paths.py', 'tests/train/test_promises.py'),
  'halonet/attention/measure.py': (
    'tests/attention/test_measure.py',
    'tests/train/test_promises.py::test_a_choice_recorded_elsewhere_is_kept_beside_and_not_used',
  ),
  'halonet/train/event_writer.py': ('tests/train/test_event_writer.py',),
  'halonet/evaluators/scores.py': ('tests/evaluators/test_scores.py',),
  'halonet/evaluators/specs.py': (
    'tests/evaluators/test_evaluators.py',
    'tests/train/test_config_checks.py',
  ),
  'halonet/evaluators/run.py': (
    'tests/evaluators/test_evaluators.py',
    'tests/evaluators/test_evaluators_in_runs.py',
  ),
  'halonet/data/randaugment.py': (
    'tests/data/test_randaugment.py',
    'tests/data/test_input_pipeline.py::test_randaugment_off_is_crop_flip_only_and_high_magnitude_changes_images',
  ),
  'halonet/train/finetune.py': ('tests/train/test_finetune.py', '-m', 'not slow'),
  'halonet/train/workdir.py': ('tests/train/test_workdir.py',),
  'halonet/train/checkpointing.py': (
    'tests/train/test_checkpointing.py',
    'tests/train/test_damaged_checkpoints.py',
  ),
  'halonet/train/progress.py': ('tests/train/test_progress.py',),
  'halonet/data/pipeline.py': (
    *_PIPELINE_TESTS,
    'tests/train/test_training_semantics.py::test_mixed_targets_weigh_the_two_images_as_the_pixels_do',
  ),
  'halonet/data/sources.py': (
    *_PIPELINE_TESTS,
    'tests/tools/test_trained.py::test_class_names_are_the_folder_names_of_the_dataset',
    'tests/tools/test_trained.py::test_imagenet_classes_are_named_by_their_lemmas_in_tfds_and_timms_order',
  ),
  'halonet/data/preprocessing.py': (
    *_PIPELINE_TESTS,
    'tests/train/test_training_semantics.py::test_mixed_targets_weigh_the_two_images_as_the_pixels_do',
  ),
  'halonet/train/step.py': (
    'tests/train/test_training_semantics.py',
    'tests/train/test_train.py::test_sharded_step_matches_one_device',
    'tests/train/test_train.py::test_train_step_compiles_once',
    'tests/train/test_train.py::test_batch_must_split_over_processes',
    'tests/train/test_data_parallel.py::test_accelerator_train_step_has_no_loop',
    'tests/attention/test_measure.py::test_training_measures_records_and_uses_the_chosen_forms',
  ),
  'halonet/train/evaluation.py': (
    'tests/train/test_eval.py::test_eval_step_sums_top1_top5_and_loss_over_the_real_rows',
    'tests/train/test_eval.py::test_a_long_evaluation_says_how_far_it_is_and_counts_each_example_once',
    'tests/train/test_eval.py::test_ema_evaluation_is_an_evaluation_of_the_ema_parameters',
    'tests/train/test_eval.py::test_eval_py_matches_training_run_and_appends_records',
    'tests/train/test_eval.py::test_compile_seconds_are_the_time_compilation_took',
  ),
  'halonet/tools/trained.py': (
    'tests/tools/test_trained.py',
    '-k',
    'not attention_map and not attention_layers and not strided_layers and not each_panel',
  ),
  'halonet/models/networks.py': _MODEL_TESTS,
  'halonet/models/checks.py': (
    'tests/models/test_model.py::test_bad_values_fail_with_one_line',
    'tests/models/test_model.py::test_unknown_config_name',
    'tests/models/test_mixers.py',
    '-k',
    'not timm',
  ),
  'halonet/models/halonet.py': (
    *_MODEL_TESTS,
    'tests/models/test_model_options.py',
    'tests/models/test_model.py::test_options_add_the_parameters_counted_by_hand',
    'tests/models/test_model.py::test_activation_is_applied_once_at_each_block_output',
    'tests/models/test_model.py::test_stochastic_depth_drops_whole_examples_at_rates_rising_with_depth',
    'tests/models/test_model.py::test_dropout_before_the_head_drops_units_at_the_given_rate',
    'tests/models/test_model.py::test_conv_stages_replace_attention',
    'tests/train/test_training_semantics.py::test_batchnorm_running_statistics_after_a_step_are_computed_from_the_batch',
    'tests/models/test_model.py::test_every_attention_layer_runs_the_form_the_config_names',
    'tests/models/test_mixers.py::test_sasa_resnets_have_table_1s_parameters_and_flops',
    'tests/models/test_model.py::test_only_mixers_that_normalise_their_output_skip_the_blocks_norm_after_them',
    'tests/tools/test_trained.py::test_features_have_strides_4_to_32_at_sizes_b_does_not_divide',
  ),
  'halonet/train/lease.py': ('tests/train/test_lease.py', '-m', 'not slow'),
  'halonet/detection/data.py': ('tests/detection/test_detection_data.py',),
  'halonet/detection/checks.py': (
    'tests/detection/test_detection_runs.py',
    '-k',
    'bad_config or edges_of_each_range',
  ),
  'halonet/train/loop.py': (
    'tests/train/test_train.py::test_evaluations_during_training_print_their_accuracy',
    'tests/train/test_train.py::test_nan_loss_stops_and_keeps_last_good_checkpoint',
    'tests/train/test_train.py::test_diverging_run_saves_only_finite_states_and_names_one',
    'tests/train/test_train.py::test_changed_config_is_refused_then_allowed',
    'tests/train/test_train.py::test_finished_run_compile_time_profile_then_rerun_changes_nothing',
    'tests/train/test_train.py::test_bad_input_fails_in_one_line_before_compile',
    'tests/train/test_finetune.py::test_bad_sources_fail_naming_the_path_before_anything_compiles',
    'tests/attention/test_measure.py::test_training_measures_records_and_uses_the_chosen_forms',
    'tests/attention/test_measure.py::test_the_train_and_eval_steps_run_the_measured_forms',
    'tests/train/test_checkpoint_resume.py',
    'tests/train/test_loop.py',
    'tests/evaluators/test_evaluators_in_runs.py',
    '-m',
    'not slow',
  ),
  'halonet/train/setup.py': (
    'tests/train/test_train.py::test_bad_input_fails_in_one_line_before_compile',
    'tests/train/test_train.py::test_changed_config_is_refused_then_allowed',
    'tests/train/test_train.py::test_finished_run_compile_time_profile_then_rerun_changes_nothing',
    'tests/train/test_train.py::test_evaluations_during_training_print_their_accuracy',
    'tests/train/test_checkpoint_resume.py',
    'tests/train/test_finetune.py::test_the_whole_state_a_fine_tune_starts_from',
    'tests/train/test_finetune.py::test_bad_sources_fail_naming_the_path_before_anything_compiles',
    'tests/train/test_finetune.py::test_a_source_of_another_architecture_is_refused_naming_each_sides_shape',
    'tests/train/test_damaged_checkpoints.py::test_training_resumes_past_a_damaged_newest_checkpoint',
    'tests/train/test_lease.py',
    'tests/train/test_promises.py',
    'tests/attention/test_measure.py::test_training_measures_records_and_uses_the_chosen_forms',
    'tests/attention/test_measure.py::test_the_train_and_eval_steps_run_the_measured_forms',
    'tests/evaluators/test_evaluators_in_runs.py',
    '-m',
    'not slow',
  ),
  'halonet/tools/visualize.py': (
    'tests/tools/test_trained.py::test_each_panel_outlines_its_querys_block_and_neighbourhood',
    'tests/tools/test_trained.py::test_attention_layers_and_their_grids_are_the_models_maps',
    'tests/tools/test_trained.py::test_a_strided_layers_weights_are_the_sown_ones_of_the_querys_block',
    'tests/tools/test_trained.py::test_attention_maps_are_the_models_weights_and_are_drawn',
    'tests/tools/test_trained.py::test_the_attention_map_command_writes_a_new_png_and_refuses_bad_queries',
  ),
  'halonet/models/conv_norm.py': (
    'tests/models/test_grouped_conv.py::test_grouped_conv_norm_act_takes_the_shifted_views_on_cpu',
    'tests/train/test_training_semantics.py::test_batchnorm_running_statistics_after_a_step_are_computed_from_the_batch',
    'tests/models/test_timm_modules.py',
    'tests/models/test_model_options.py',
    'tests/tools/test_timm_parity.py::test_converted_model_gives_timms_logits_and_stage_features',
  ),
}
_SWAPS = {
  ast.Add: ast.Sub,
  ast.Sub: ast.Add,
  ast.Mult: ast.Div,
  ast.Div: ast.Mult,
  ast.FloorDiv: ast.Div,
  ast.Mod: ast.FloorDiv,
  ast.Pow: ast.Mult,
  ast.Lt: ast.LtE,
  ast.LtE: ast.Lt,
  ast.Gt: ast.GtE,
  ast.GtE: ast.Gt,
  ast.Eq: ast.NotEq,
  ast.NotEq: ast.Eq,
  ast.In: ast.NotIn,
  ast.NotIn: ast.In,
  ast.Is: ast.IsNot,
  ast.IsNot: ast.Is,
  ast.And: ast.Or,
  ast.Or: ast.And,
}


@dataclasses.dataclass(frozen=True)
class Mutant:
  index: int  # Its place in the module's walk: the same source gives the same mutants.
  line: int
  description: str

  @property
  def key(self) -> str:
    return f'L{self.line} {self.description}'


def _untouchable(tree: ast.Module) -> set[int]:
  """ids of nodes no mutation enters: docstrings, f-strings, annotations, raise statements."""
  skip = set()
  for node in ast.walk(tree):
    roots = []
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        roots.append(body[0])
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      roots += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
      roots += [node.returns] if node.returns else []
    if isinstance(node, ast.AnnAssign):
      roots.append(node.annotation)
    if isinstance(node, (ast.JoinedStr, ast.Raise)):
      roots.append(node)
    for root in roots:
      skip.update(id(n) for n in ast.walk(root))
  return skip


class _Mutator(ast.NodeTransformer):
  """Walks a module, numbering each possible mutation; applies the one numbered `target`."""

  def __init__(self, skip: set[int], target: int = -1):
    self.skip, self.target, self.found = skip, target, []

  def _site(self, node: ast.AST, description: str) -> bool:
    """Records a site; True where it is the one to apply."""
    self.found.append(Mutant(len(self.found), node.lineno, description))
    return len(self.found) - 1 == self.target

  def visit(self, node):
    if id(node) in self.skip:
      return node
    return super().visit(node)

  def _swap(self, node, op, replace):
    swapped = _SWAPS.get(type(op))
    if swapped and self._site(node, f'{type(op).__name__} -> {swapped.__name__}'):
      replace(swapped())

  def visit_BinOp(self, node):
    self._swap(node, node.op, lambda new: setattr(node, 'op', new))
    return self.generic_visit(node)

  def visit_AugAssign(self, node):
    self._swap(node, node.op, lambda new: setattr(node, 'op', new))
    return self.generic_visit(node)

  def visit_BoolOp(self, node):
    self._swap(node, node.op, lambda new: setattr(node, 'op', new))
    for i in range(len(node.values)):
      if self._site(node, f'drop operand {i + 1} of {type(node.op).__name__}'):
        rest = node.values[:i] + node.values[i + 1 :]
        node = rest[0] if len(rest) == 1 else ast.copy_location(ast.BoolOp(node.op, rest), node)
        break
    return self.generic_visit(node)

  def visit_Compare(self, node):
    for i, op in enumerate(node.ops):
      self._swap(node, op, lambda new, i=i: node.ops.__setitem__(i, new))
    return self.generic_visit(node)

  def visit_UnaryOp(self, node):
    if isinstance(node.op, (ast.Not, ast.USub)) and self._site(
      node, f'drop {type(node.op).__name__}'
    ):
      return self.generic_visit(node.operand)
    return self.generic_visit(node)

  def visit_Constant(self, node):
    value = node.value
    if isinstance(value, bool):
      new = not value
    elif isinstance(value, int):
      new = value + 1
    elif isinstance(value, float):
      new = value * 2 if value else 1.0
    else:
      return node
    if self._site(node, f'{value!r} -> {new!r}'):
      return ast.copy_location(ast.Constant(new), node)
    return node

  def visit_If(self, node):
    for value in (True, False):
      if self._site(node, f'condition -> {value}'):
        node.test = ast.copy_location(ast.Constant(value), node.test)
        return self.generic_visit(node)
    return self.generic_visit(node)

  def visit_Call(self, node):
    for i, keyword in enumerate(node.keywords):
      if keyword.arg and self._site(node, f'drop keyword {keyword.arg}='):
        del node.keywords[i]
        return self.generic_visit(node)
    if len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]):
      if self._site(node, 'swap arguments 1 and 2'):
        node.args[0], node.args[1] = node.args[1], node.args[0]
    return self.generic_visit(node)

  def visit_Expr(self, node):
    if isinstance(node.value, ast.Call) and self._site(node, 'delete call statement'):
      return ast.copy_location(ast.Pass(), node)
    return self.generic_visit(node)


def mutants(source: str) -> list[Mutant]:
  tree = ast.parse(source)
  mutator = _Mutator(_untouchable(tree))
  mutator.visit(tree)
  return mutator.found


def mutated_source(source: str, mutant: Mutant) -> str:
  tree = ast.parse(source)
  mutator = _Mutator(_untouchable(tree), mutant.index)
  tree = ast.fix_missing_locations(mutator.visit(tree))
  return ast.unparse(tree)


def _workspace(directory: pathlib.Path) -> pathlib.Path:
  ignore = shutil.ignore_patterns('.git', '__pycache__', '.pytest_cache', 'mutation', '.ruff_cache')
  shutil.copytree(ROOT, directory, ignore=ignore, symlinks=True)
  return directory


def _run_tests(
  workspace: pathlib.Path, tests: tuple[str, ...], timeout: float, jax_cache: pathlib.Path
) -> str:
  """'passed', 'failed' or 'timeout' for the tests in `workspace`.

  Every run of a module shares one JAX compilation cache: a mutant that leaves a program as it
  was loads it instead of compiling it again (the cache is keyed by the program).
  """
  command = [sys.executable, '-m', 'pytest', '-x', '-q', '-n', '0', '-p', 'no:cacheprovider']
  env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1', 'HALONET_TESTS_JAX_CACHE': str(jax_cache)}
  try:
    result = subprocess.run(
      [*command, *tests], cwd=workspace, env=env, capture_output=True, timeout=timeout
    )
  except subprocess.TimeoutExpired:
    return 'timeout'
  return 'passed' if result.returncode == 0 else 'failed'


def _report_path(module: str) -> pathlib.Path:
  return RESULTS / f'{module.replace("/", ".").removesuffix(".py")}.json'


def _run_module(module: str, jobs: int, only_survivors: bool, sample: int | None) -> dict:
  source = (ROOT / module).read_text()
  tests = COVERING[module]
  found = mutants(source)
  total = len(found)
  if only_survivors:
    last = json.loads(_report_path(module).read_text())
    if last.get('sampled'):  # As many of each key as were sampled (a key can recur on a line).
      wanted, kept = collections.Counter(last['sampled']), []
      for m in found:
        if wanted[m.key] > 0:
          wanted[m.key] -= 1
          kept.append(m)
      found = kept
  elif sample is not None and sample < len(found):
    found = sorted(random.Random(0).sample(found, sample), key=lambda m: m.index)
  outcomes = {}
  to_run = found
  if only_survivors:
    survived = {s['mutant'] for s in last['survivors']}
    outcomes = {m: 'failed' for m in found if m.key not in survived}
    to_run = [m for m in found if m.key in survived]
  with tempfile.TemporaryDirectory(prefix='mutate-') as scratch:
    jax_cache = pathlib.Path(scratch) / 'jax_cache'
    workspaces = [_workspace(pathlib.Path(scratch) / str(j)) for j in range(jobs)]
    start = time.monotonic()
    if _run_tests(workspaces[0], tests, 1800, jax_cache) != 'passed':
      raise SystemExit(f'{module}: its tests {tests} fail before any mutation')
    timeout = 3 * (time.monotonic() - start) + 30

    def run(mutant: Mutant, workspace: pathlib.Path) -> str:
      target = workspace / module
      target.write_text(mutated_source(source, mutant))
      try:
        return _run_tests(workspace, tests, timeout, jax_cache)
      finally:
        target.write_text(source)

    free = list(workspaces)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      pending = {}
      for mutant in to_run:
        if not free:
          done, _ = concurrent.futures.wait(pending, return_when='FIRST_COMPLETED')
          for future in done:
            m, workspace = pending.pop(future)
            outcomes[m] = future.result()
            free.append(workspace)
            print(f'  {module} {m.key}: {outcomes[m]}', flush=True)
        workspace = free.pop()
        pending[pool.submit(run, mutant, workspace)] = (mutant, workspace)
      for future in concurrent.futures.as_completed(pending):
        m, _ = pending[future]
        outcomes[m] = future.result()
        print(f'  {module} {m.key}: {outcomes[m]}', flush=True)
  lines = source.splitlines()
  survivors = [
    {'mutant': m.key, 'code': lines[m.line - 1].strip()} for m in found if outcomes[m] == 'passed'
  ]
  report = {
    'module': module,
    'tests': list(tests),
    **({'sampled': [m.key for m in found], 'of': total} if len(found) < total else {}),
    'mutants': len(found),
    'survivors': survivors,
  }
  return _scored(report)


def _scored(report: dict) -> dict:
  """The report with each survivor's equivalence (equivalent.json) and the score."""
  equivalent = _equivalent().get(report['module'], {})
  for survivor in report['survivors']:
    survivor['equivalent'] = equivalent.get(survivor['mutant'])
  found = report['mutants']
  counted = found - sum(1 for s in report['survivors'] if s['equivalent'])
  killed = found - len(report['survivors'])
  return {
    **report,
    'killed': killed,
    'equivalent': found - counted,
    'score': killed / counted if counted else 1.0,
  }


def _equivalent() -> dict:
  path = RESULTS / 'equivalent.json'
  return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('modules', nargs='*', default=list(COVERING))
  parser.add_argument('--jobs', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--list', action='store_true')
  parser.add_argument('--survivors', action='store_true')
  parser.add_argument('--rescore', action='store_true')
  parser.add_argument('--sample', type=int)
  args = parser.parse_args()
  unknown = [m for m in args.modules if m not in COVERING]
  if unknown:
    raise SystemExit(f'{unknown[0]} has no covering tests in COVERING: {list(COVERING)}')
  for module in args.modules:
    if args.list:
      for m in mutants((ROOT / module).read_text()):
        print(f'{module} {m.key}')
      continue
    if args.rescore:
      report = _scored(json.loads(_report_path(module).read_text()))
    else:
      report = _run_module(module, args.jobs, args.survivors, args.sample)
    RESULTS.mkdir(exist_ok=True)
    _report_path(module).write_text(json.dumps(report, indent=2) + '\n')
    sampled = f' (a sample of {report["of"]})' if 'of' in report else ''
    print(
      f'{module}: {report["killed"]}/{report["mutants"] - report["equivalent"]} killed{sampled} '
      f'({100 * report["score"]:.0f}%), {report["equivalent"]} equivalent'
    )
    for s in report['survivors']:
      mark = f'  [equivalent: {s["equivalent"]}]' if s['equivalent'] else ''
      print(f'  survived {s["mutant"]}: {s["code"]}{mark}')


if __name__ == '__main__':
  main()
