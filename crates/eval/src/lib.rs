//! Evaluation for pg2: metrics (CIDEr, VQA accuracy, ANLS, RefCOCO IoU, ...) and the
//! evaluators that run them during and after training (work in progress: see the
//! evaluation issue; nothing here yet).
