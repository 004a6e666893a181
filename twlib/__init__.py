"""The ThreadWeaver reproduction kit's library (docs/design.md §3: where each paper step lives)."""
import warnings

# TRL checks the installed vLLM against the versions it was released with and warns on import; the CPU build
# of vLLM (0.32) is newer than that list although the kit uses none of what changed. One known false alarm
# should not open every notebook cell and log.
warnings.filterwarnings("ignore", message=r"TRL currently supports vLLM versions", category=UserWarning)
