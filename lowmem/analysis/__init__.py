"""lowmem.analysis: measurements of training runs that decide how an optimizer is configured.

- :mod:`lowmem.analysis.snr`: SlimAdam's SNR of Adam's second moment, recorded during a run;
- :mod:`lowmem.analysis.depth_patterns`: per-layer rules folded into patterns over depth;
- :mod:`lowmem.analysis.snr_table`, :mod:`lowmem.analysis.snr_plots`: the table and figures of
  ``lowmem snr`` (docs/snr.md).
"""

from lowmem.analysis.depth_patterns import generalise_over_depth
from lowmem.analysis.snr import ParamSNR, SNRRecorder, choose_rules

__all__ = ["ParamSNR", "SNRRecorder", "choose_rules", "generalise_over_depth"]
