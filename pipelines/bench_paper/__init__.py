"""The paper's recommendation experiments, rerun on the library's own data and teachers.

``recdistill bench paper`` runs, on the job config's data (ML-100K by default):

- **Table 3**: LD, FD, SCKD and DiverseDistill from a single teacher: the language teacher,
  then MLP-L;
- **Table 4**: MT, AMTML, AutoSKD, AEKD and DiverseDistill from the committee language + MLP-L;
- **Table 5**: DiverseDistill from a similar committee (MLP-M + MLP-L) against the diverse one;
- **gating**: DiverseDistill with the three-teacher committee (language, MLP-L, MLP-M),
  ungated and gated at several thresholds: teacher passes saved against test MSE;
- **Figure 4**: the importance scores of 11 random test rows for the three teachers (PNG).

Every cell (table, method, teachers, options, seed) is one student run under the job's
``train:`` budget, by the job engine's own stages; its result is a JSON file in ``OUT/cells/``,
written atomically, so a killed bench resumes where it stopped and a finished cell is not rerun
unless asked. Teachers are trained once (``OUT/teachers/NAME/``, with the job's ``teachers:``
settings) and shared by every cell. Where a method's weight has no earlier choice, a small grid
runs on the first seed and the best on the *validation* split is used for every seed (the test
split only reports). Cells run in ``workers`` processes of one torch thread each. The report
(``paper_tables.md``), a CSV of every cell and the PNGs are rebuilt from the cell files. Rooms:

- :mod:`~pipelines.bench_paper.plan`: the rows, cells and budgets;
- :mod:`~pipelines.bench_paper.cells`: the teachers and one cell's run (the engine's stages);
- :mod:`~pipelines.bench_paper.schedule`: which cells run when, in which workers, MLflow;
- :mod:`~pipelines.bench_paper.report`: the tables, the CSV and the plots.

Example::

    plan = paper_plan(quick=False, seeds=[0, 1, 2])
    run_bench(load_config("paper"), plan, Path("runs/bench_paper"), workers=2)
    write_report(Path("runs/bench_paper"), plan)
"""

from pipelines.bench_paper.cells import _write_json, read_cells, run_cell, teacher_scores, train_teachers
from pipelines.bench_paper.plan import (
    LANGUAGE,
    METHOD_GRIDS,
    METHOD_OPTIONS,
    BenchPlan,
    Cell,
    Row,
    _options,
    paper_plan,
)
from pipelines.bench_paper.report import _mean_std, summarize, write_report
from pipelines.bench_paper.schedule import choose, mlflow_logger, planned_cells, run_bench, stop_pool

__all__ = ["LANGUAGE", "METHOD_GRIDS", "METHOD_OPTIONS", "BenchPlan", "Cell", "Row", "_mean_std", "_options",
           "_write_json", "choose", "mlflow_logger", "paper_plan", "planned_cells", "read_cells", "run_bench",
           "run_cell", "stop_pool", "summarize", "teacher_scores", "train_teachers", "write_report"]  # fmt: skip
