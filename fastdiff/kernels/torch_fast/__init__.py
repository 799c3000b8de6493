"""The fast PyTorch step (backend ``"torch-fast"``): what ``auto`` runs when no compiled kernel can."""
