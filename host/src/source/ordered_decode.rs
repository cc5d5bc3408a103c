//! Blocks of a compressed image decoded on worker threads and handed over in their order: the
//! pool under the parallel squashfs and xz readers. The reader sends block numbers (as many as
//! its window allows) and takes them back one after another; a decoder's panic on a hostile
//! block answers for that block with an error, so the reader never waits for it forever.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Decodes block `i`, its stored bytes read into the buffer given (one buffer a worker).
pub type DecodeFn = dyn Fn(usize, &mut Vec<u8>) -> std::io::Result<Vec<u8>> + Send + Sync;

type Decoded = (usize, std::io::Result<Vec<u8>>);

/// Worker threads decoding the blocks they are sent; dropped, they finish the block they hold
/// and stop.
pub struct OrderedDecoders {
    jobs: Option<mpsc::Sender<usize>>,
    results: mpsc::Receiver<Decoded>,
    workers: Vec<JoinHandle<()>>,
    /// Blocks decoded before their turn.
    arrived: HashMap<usize, std::io::Result<Vec<u8>>>,
    /// What the blocks are of, for errors ("squashfs data block", "xz block").
    what: &'static str,
}

impl OrderedDecoders {
    /// Starts `threads` workers decoding with `decode`.
    pub fn start(threads: usize, what: &'static str, decode: Arc<DecodeFn>) -> Self {
        let (jobs, job_rx) = mpsc::channel::<usize>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (result_tx, results) = mpsc::channel::<Decoded>();
        let workers = (0..threads.max(1))
            .map(|_| {
                let (decode, job_rx, result_tx) = (decode.clone(), job_rx.clone(), result_tx.clone());
                std::thread::spawn(move || decode_jobs(&*decode, what, &job_rx, &result_tx))
            })
            .collect();
        Self { jobs: Some(jobs), results, workers, arrived: HashMap::new(), what }
    }

    /// Has block `i` decoded; false if the workers are gone.
    pub fn send(&self, i: usize) -> bool {
        self.jobs.as_ref().is_some_and(|jobs| jobs.send(i).is_ok())
    }

    /// Block `i`, decoded (it must have been sent), waiting for it.
    pub fn take(&mut self, i: usize) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(r) = self.arrived.remove(&i) {
                return r;
            }
            let (j, r) = self
                .results
                .recv()
                .map_err(|_| std::io::Error::other(format!("the {} decoder threads stopped", self.what)))?;
            self.arrived.insert(j, r);
        }
    }
}

impl Drop for OrderedDecoders {
    fn drop(&mut self) {
        // Workers finish the block they hold, find the queue closed, and return.
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One worker: decodes the blocks it is sent with `decode` until the reader hangs up.
fn decode_jobs(decode: &DecodeFn, what: &str, jobs: &Mutex<mpsc::Receiver<usize>>, results: &mpsc::Sender<Decoded>) {
    let mut stored = Vec::new();
    loop {
        let Ok(i) = jobs.lock().map_err(drop).and_then(|rx| rx.recv().map_err(drop)) else { return };
        // A decoder crate's panic on a hostile block must still answer for the block: the
        // reader waits for each block in turn, and the other workers keep its queue open.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(i, &mut stored)))
            .unwrap_or_else(|_| Err(std::io::Error::other(format!("decoding {what} {i} failed"))));
        if results.send((i, decoded)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks come back in the order asked for, whatever order the workers finish them in; a
    /// decoder that panics on a hostile block gives that block an error, not a hang, and the
    /// blocks after it still decode.
    #[test]
    fn blocks_come_back_in_order_and_a_panic_is_an_error_not_a_hang() {
        let decode: Arc<DecodeFn> = Arc::new(|i: usize, _: &mut Vec<u8>| {
            assert!(i != 3, "hostile block");
            std::thread::sleep(std::time::Duration::from_millis(((7 - i) % 4) as u64 * 5));
            Ok(vec![i as u8; i])
        });
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let mut pool = OrderedDecoders::start(3, "test block", decode);
            for i in 0..8 {
                assert!(pool.send(i));
            }
            let got: Vec<_> = (0..8).map(|i| pool.take(i).map_err(|e| e.to_string())).collect();
            let _ = done.send(got);
        });
        let got = finished.recv_timeout(std::time::Duration::from_secs(20)).expect("every block has a result");
        for (i, got) in got.into_iter().enumerate() {
            if i == 3 {
                assert_eq!(got, Err("decoding test block 3 failed".into()));
            } else {
                assert_eq!(got, Ok(vec![i as u8; i]));
            }
        }
    }
}
