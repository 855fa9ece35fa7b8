//! Distributed training for pg2: rendezvous, collectives (NCCL on GPUs, TCP ring on CPUs)
//! and worker launch (work in progress: see the multi-GPU issue; nothing here yet).
