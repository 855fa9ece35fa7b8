//! Optimizers, learning-rate schedules and sweeps for pg2 (work in progress: see the
//! optimizer issue; nothing here yet).
