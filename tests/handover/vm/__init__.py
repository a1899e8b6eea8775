"""The tiny VM of the live-migration test: guest.asm (boot sector), pattern.py (its data), vmctl.py (QEMU + QMP)."""
