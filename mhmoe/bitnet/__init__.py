"""BitNet b1.58 as a module swap: quantisers, training modules, integer inference twins."""
