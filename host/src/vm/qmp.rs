//! The QMP monitor, used to stop qemu gracefully.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one QMP exchange may take.
const QMP_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks qemu to quit. Blocking; a closed connection after the command counts as success.
pub fn quit(socket: &Path) -> Result<(), String> {
    let stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot connect to QMP at {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(QMP_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(QMP_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut qmp = qapi::Qmp::from_stream(&stream);
    qmp.handshake().map_err(|e| format!("QMP handshake failed: {e}"))?;
    match qmp.execute(&qapi::qmp::quit {}) {
        Ok(_) => Ok(()),
        // qemu may close the connection before answering a quit.
        Err(qapi::ExecuteError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(format!("QMP quit failed: {e}")),
    }
}
