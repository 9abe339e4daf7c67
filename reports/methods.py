"""The report's Methods section: every rule the findings and figures follow, stated with its constants.

Written as plain HTML from the constants the code uses (margin, level, tolerance, minimum sizes),
so that the rule a reader is told and the rule that was applied cannot drift apart.
"""

from __future__ import annotations

import html

from reports import chance, compute, matching, scaling, stats
from reports.tables import Prepared


def _e(value) -> str:
    return html.escape(str(value))


def _li(title: str, text: str) -> str:
    return f"<li><b>{_e(title)}.</b> {text}</li>"


def statistics(prep: Prepared) -> str:
    level = f"{stats.LEVEL * 100:g}%"
    margin = chance.LEARNED_MARGIN
    r_crit = ", ".join(f"{stats.r_critical(n):.3f} at {n} sizes" for n in (3, 4, 5))
    items = [
        _li(
            "Chance level",
            "MQAR: a model that guesses uniformly among the task's values (the tokens from vocab_size // 2 "
            "up to vocab_size, so vocab_size - vocab_size // 2 of them) has accuracy one over that number "
            "and loss its natural log. Language modelling: the unigram loss, when the runs table has it (a "
            f"column {_e(' / '.join(chance.UNIGRAM_COLUMNS))}). Any other metric has no known chance level, "
            "and its runs are not screened (the report then says so).",
        ),
        _li(
            "Learned",
            f"A run learned when it closed at least {margin:.0%} of the distance from chance to a perfect "
            f"score: accuracy above chance + {margin:g} x (1 - chance), or loss below {1 - margin:g} x the "
            "chance loss. A model at a size enters a comparison only when every one of its seeds at its "
            "chosen learning rate learned; a model that learned in some seeds only, or in none, is listed "
            "as such and compared with nothing (averaging a seed that learned with one that did not "
            "describes neither).",
        ),
        _li(
            "Intervals",
            f"Each mean over seeds comes with its {level} Student t interval (n - 1 degrees of freedom), cut "
            "at the metric's possible range (accuracy lies in [0, 1]); one seed gives no interval. Figures "
            "draw the interval as a bar and every seed as a dot.",
        ),
        _li(
            "Verdicts",
            f"Two models are compared through the {level} Welch t interval of the difference of their means "
            "(unequal variances; Welch-Satterthwaite degrees of freedom): better or worse when the interval "
            "excludes zero, otherwise cannot tell at this number of seeds. When either side has a single "
            "seed there is no interval: the verdict is cannot tell and no difference is printed. A best "
            "model is named only when its difference to the next best has an interval above zero. No "
            "correction for multiple comparisons is made: over many sizes and pairs, some verdicts are "
            "expected to be wrong by chance.",
        ),
        _li(
            "Trends across sizes",
            f"Stated only over at least {scaling.MIN_SIZES} sizes where both models learned in every seed, "
            "with at least two seeds each: the least-squares slope of the per-size mean gap against log2 of "
            f"Palimpsa's parameter count (the change per doubling), with its {level} t interval on n - 2 "
            "degrees of freedom. The interval reflects the scatter of the gaps around the line, not each "
            "gap's own seed noise.",
        ),
        _li(
            "Why the gap moves",
            "Over the same sizes, the Pearson r between the gap and each factor measured on Palimpsa's "
            "runs: state elements per stored key-value pair (the state size below divided by "
            "task.num_kv_pairs), the memory horizon, the fraction of consolidated synapses and the "
            "effective learning rate (the diag.* metrics), the learning-rate sensitivity (mean at the best "
            "learning rate minus mean at the worst one tried) and the throughput relative to the baseline. "
            "A factor tracks the gap only when |r| exceeds the critical value of the t test of r = 0 at "
            f"{level} ({r_crit}). Factors that all grow with size move together, so a factor that tracks the "
            "gap is an association, not a cause.",
        ),
        _li(
            "Matchings",
            "Equal parameters and equal state: the baseline config nearest to Palimpsa's in num_params or "
            f"in state elements (by ratio), accepted within x{matching.TOLERANCE:g}, possibly at another "
            "size. Equal training time and equal FLOPs: the baseline at the same size, both read off their "
            "learning curves at the smaller of the two final spends (the last evaluation at or before it); "
            "every seed must have learned at that point. Time is measured optimizer-step time, spread "
            "evenly over steps.",
        ),
        _li(
            "Two loads",
            "When runs differ in task.num_kv_pairs, each model's config at the higher load is set against "
            "its config at a lower load nearest in state elements per stored pair (accepted within "
            f"x{matching.TOLERANCE:g}): a verdict when both learned in every seed, each side's count of "
            "learned seeds when one did and the other did not. If recall were set by the state per pair "
            "alone, the two would agree.",
        ),
        _li(
            "Recall by distance",
            "When runs log recall_gap.&lt;lo&gt;-&lt;hi&gt; (accuracy on the queries whose key stood lo to "
            "hi tokens earlier), the report gives each learned model's recall at the nearest and farthest "
            "distance with intervals and compares Palimpsa with its strongest baseline at the farthest "
            "distance.",
        ),
        _li(
            "Learning rate",
            "Each model's learning rate is the one with the best mean over the seeds run at every rate "
            "tried (all its seeds on a full grid; seeds added at the chosen rate afterwards do not take part "
            "in the choice); every seed at that rate is kept, none dropped.",
        ),
    ]
    return "<h3>Statistics</h3><ul class='methods'>" + "".join(items) + "</ul>"


def cost_model() -> str:
    per_element = ", ".join(f"{k} {v:g}" for k, v in compute.STATE_FLOPS_PER_ELEMENT.items())
    return (
        "<h3>Training FLOPs</h3><p>flops = 6 x num_params x tokens + 3 x tokens x (mixer state work per "
        "token). The first term is the usual dense-matrix count of forward and backward passes (embeddings "
        "included: an overestimate for tied embeddings that is the same for every mixer at one d_model); "
        f"the second adds the recurrent state work of the forward pass, times {compute.TRAIN_OVER_FORWARD:g} "
        "for forward plus backward, which is what separates the mixers at equal size. Tokens are the logged "
        "tokens metric, else steps x batch size x sequence length.</p><p>Mixer state work per state element "
        f"and token (forward multiply-adds): {_e(per_element)}. A metaplastic mixer with metaplasticity off "
        "counts as Mamba2; Mesa adds a K x K precision update and an exact K x K solve per head; softmax "
        "attention counts Q K^T and A V over half the sequence on average.</p><h3>State "
        "size</h3><p>Recurrent state per sequence, summed over layers (floats held between tokens): linear "
        "recurrences hold heads x K x V per layer; the importance state of a metaplastic mixer doubles it; "
        "Mesa adds a K x K precision per head; softmax attention holds its key-value cache, 2 x d_model per "
        "token at the full sequence length.</p>"
    )


def render(prep: Prepared) -> str:
    return "<h2>Methods</h2>" + statistics(prep) + cost_model()
