"""Pure tensor math of SAT: importance, selection and the sparse autograd ops. No HF imports."""
