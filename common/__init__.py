"""The bottom layer every package may import (stdlib only, no torch): the user-error type and folder locks."""
