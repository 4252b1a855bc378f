//! Data-parallel ranks on MPI (the optional `mpi` feature, Open MPI through the `mpi` crate). Without `mpirun`,
//! or without the feature, there is one rank and every collective is the identity, so single-process runs take
//! exactly the code path they always did.
//!
//! Only the main thread calls MPI (the engine's worker threads never do), so `MPI_THREAD_FUNNELED` suffices.
use crate::error::{Error, Result};

/// This process's place among the ranks of a run, and the collectives the trainer needs.
pub struct Ranks {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    world: Option<(mpi::environment::Universe, mpi::topology::SimpleCommunicator)>,
}

/// The world size an MPI launcher (Open MPI's `mpirun`, or a PMI/PMIx one) announces in the environment.
fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
}

impl Ranks {
    /// One process, no MPI.
    pub fn single() -> Self {
        Ranks {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            world: None,
        }
    }

    /// The ranks of this launch: MPI's world when started by `mpirun` (with the feature), else one process.
    /// Started by `mpirun -np N` (N > 1) without the feature, it refuses: N copies would each train alone and
    /// overwrite each other's output.
    pub fn from_launcher() -> Result<Self> {
        let announced = launcher_world_size().unwrap_or(1);
        #[cfg(feature = "mpi")]
        if launcher_world_size().is_some() {
            use mpi::traits::Communicator;
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| Error::Train("MPI could not be initialised (already initialised?)".into()))?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            return Ok(Ranks { rank, size, world: Some((universe, world)) });
        }
        if announced > 1 {
            return Err(Error::Train(format!(
                "started by an MPI launcher with {announced} ranks, but this kto was built without the `mpi` feature; \
                 build with `cargo build --release --features mpi`"
            )));
        }
        Ok(Ranks::single())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0 writes logs, checkpoints and the model.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// `sum_f32` over an engine buffer, through its host hook.
    pub fn sum_buffer(&self, buf: &mut crate::engine::Buffer) {
        if self.size > 1 {
            buf.with_host_mut(|v| self.sum_f32(v));
        }
    }

    /// Element-wise sum over the ranks, in place, on every rank.
    pub fn sum_f32(&self, buf: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some((_, world)) = &self.world {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let send = buf.to_vec();
            world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        let _ = buf;
    }

    /// Element-wise sum over the ranks, in place, on every rank.
    pub fn sum_f64(&self, buf: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some((_, world)) = &self.world {
            use mpi::collective::SystemOperation;
            use mpi::traits::CommunicatorCollectives;
            let send = buf.to_vec();
            world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        let _ = buf;
    }

    /// Whether any rank says yes (a stop request seen by one rank stops all at the same step).
    pub fn any(&self, flag: bool) -> bool {
        let mut v = [flag as u8 as f64];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some((_, world)) = &self.world {
            use mpi::traits::CommunicatorCollectives;
            world.barrier();
        }
    }

    /// Stops every rank (after this one hit an error the others cannot know of): MPI_Abort, so no rank waits
    /// forever in a collective. A no-op for one process.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some((_, world)) = &self.world {
            use mpi::traits::Communicator;
            if self.size > 1 {
                world.abort(code);
            }
        }
        let _ = code;
    }
}
