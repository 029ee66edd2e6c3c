"""``python -m moetrain.testing MARGINS_FILE [TOP]``: the comparisons that came closest to their bounds."""

import sys

from moetrain.testing.equivalence import margin_report

print(margin_report(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))
