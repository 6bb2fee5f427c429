"""The bottom layer every package may import (stdlib only, no torch import): user errors and the one place they
become an exit status (``errors``), folder locks (``lock``), atomic writes (``io``), seeds (``seeding``) and
image conventions (``images``)."""
