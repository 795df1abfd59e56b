"""CounterFact / zsRE evaluation as in the ROME and MEMIT papers.

    from tracer.evaluate import load_cases, run_evaluation
    summary = run_evaluation("smollm2-135m", "memit", "counterfact", "out/memit", limit=200, batch_size=100)

- :mod:`.records`: datasets as :class:`Case` records; :mod:`.metrics`: the papers' metrics, from
  :mod:`tracer.scoring`'s teacher-forced probabilities (the ones ``check_edit`` shows) and
  :mod:`tracer.generation`'s samples; :mod:`.text`: n-gram entropy and TF-IDF; :mod:`.methods`: the
  registry of editing methods (none / FT-L / ROME / MEMIT); :mod:`.harness`: per-case JSON and
  summaries; :mod:`.report`: Markdown and HTML tables.
"""
from ..edit.hparams import FTLHyperParams
from ..scoring import TargetScore, score_targets
from .harness import load_case_results, run_evaluation, summarize_results, write_summary
from .methods import METHODS, make_method
from .metrics import case_scores, harmonic_mean, measure_probabilities, summarize
from .records import DATASETS, Case, load_cases
from .report import summary_html, summary_markdown
from .text import Tfidf, ngram_entropy

__all__ = ["Case", "DATASETS", "FTLHyperParams", "METHODS", "TargetScore", "Tfidf", "case_scores", "harmonic_mean",
           "load_case_results", "load_cases", "make_method", "measure_probabilities", "ngram_entropy", "run_evaluation",
           "score_targets", "summarize", "summarize_results", "summary_html", "summary_markdown", "write_summary"]
