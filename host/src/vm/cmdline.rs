//! The qemu command line of the helper VM, built as a pure function of its inputs.
//!
//! Every file qemu touches arrives as an inherited descriptor: disks and serial ports through
//! `-add-fd` fdsets, kernel and initramfs through `/proc/self/fd/N`, QMP as a listening socket.
//! qemu therefore needs no access to any path, and can run as an unprivileged user inside
//! `-sandbox` (qemu 7.2 kills itself with SIGSYS when `-runas` meets `elevateprivileges=deny`;
//! qemu ≥ 9.1 has no `-runas` at all — dropping privileges before exec works with both).

use super::accel::Accel;
use imgforge_protocol::helper_vm::{disk_serial, BULK_SERIAL, PAYLOAD_SERIAL, TARGET_SERIAL};

/// qemu's seccomp sandbox: no obsolete syscalls, no setuid/setgid, no fork/exec, no scheduler
/// or resource changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// qemu's protocol driver for a disk: `host_device` for block devices (qemu refuses `file`
/// there), `file` for regular files.
pub fn protocol_driver(is_device: bool) -> &'static str {
    if is_device {
        "host_device"
    } else {
        "file"
    }
}

/// Disk image format given to qemu explicitly (never probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw image or block device.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// qemu's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Descriptor numbers (as inherited by qemu) and settings for one VM.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Accelerator for this attempt.
    pub accel: Accel,
    /// qemu's `-cpu` model for it.
    pub cpu: String,
    /// Guest memory.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Kernel command line.
    pub kernel_cmdline: String,
    /// Kernel image descriptor.
    pub kernel_fd: i32,
    /// Initramfs descriptor.
    pub initrd_fd: i32,
    /// Target disk opened read-only.
    pub disk_ro_fd: i32,
    /// Target disk opened read-write (None: it is only the read-only base of `overlay`).
    pub disk_rw_fd: Option<i32>,
    /// Target disk format.
    pub disk_format: DiskFormat,
    /// Whether the disk descriptors carry O_DIRECT (then `cache=none`).
    pub disk_direct: bool,
    /// Whether the disk is a block device (qemu's `host_device` driver, not `file`).
    pub disk_is_device: bool,
    /// A qcow2 overlay over the disk that receives every write (transactional customization).
    pub overlay: Option<OverlayFds>,
    /// The guest's other disks (`-a` given several times), in order, each only read and
    /// written through an overlay of its own.
    pub extra_disks: Vec<ExtraDiskFds>,
    /// More overlays over the same disk, each its own virtio disk with this serial number (a
    /// multi-variant run: one overlay a variant).
    pub more_overlays: Vec<(OverlayFds, String)>,
    /// Parameter floppy, read-only.
    pub floppy_fd: i32,
    /// Payload disk, read-only, if any.
    pub payload_fd: Option<i32>,
    /// The raw disk the helper writes its digest cache to, if any: opened read-only and
    /// read-write.
    pub export_fds: Option<(i32, i32)>,
    /// The raw disk the host writes other boots' digests to, read-only, if any.
    pub import_fd: Option<i32>,
    /// Bulk disk (large payload files, raw), read-only, if any.
    pub bulk_fd: Option<i32>,
    /// Write end of the console pipe (serial 0).
    pub console_fd: i32,
    /// Write end of the report pipe (serial 1).
    pub report_fd: i32,
    /// Listening QMP socket.
    pub qmp_fd: i32,
}

/// The overlay's descriptors.
#[derive(Debug, Clone, Copy)]
pub struct OverlayFds {
    /// Opened read-only.
    pub ro_fd: i32,
    /// Opened read-write.
    pub rw_fd: i32,
    /// Whether they carry O_DIRECT.
    pub direct: bool,
}

/// One of the guest's other disks: opened read-only, the base of its own overlay.
#[derive(Debug, Clone, Copy)]
pub struct ExtraDiskFds {
    /// The disk, opened read-only.
    pub ro_fd: i32,
    /// Its format.
    pub format: DiskFormat,
    /// Whether its descriptor carries O_DIRECT.
    pub direct: bool,
    /// Whether it is a block device.
    pub is_device: bool,
    /// Its overlay.
    pub overlay: OverlayFds,
}

/// The fdsets of the other disks start here, two each (the disk, its overlay).
const FDSET_EXTRA_DISKS: u32 = 10;
const FDSET_DISK: u32 = 1;
const FDSET_OVERLAY: u32 = 6;
const FDSET_FLOPPY: u32 = 2;
const FDSET_PAYLOAD: u32 = 3;
const FDSET_CONSOLE: u32 = 4;
const FDSET_REPORT: u32 = 5;
const FDSET_EXPORT: u32 = 8;
const FDSET_BULK: u32 = 7;
const FDSET_IMPORT: u32 = 9;
/// The first fdset of [`QemuConfig::more_overlays`]; one set each from here, past any the
/// other disks could take.
const FDSET_MORE_OVERLAYS: u32 = 1000;

/// The machine every run of ours gets: no defaults, no display, no network, the seccomp
/// sandbox, and an exit instead of a reboot.
fn machine_args(name: &str, accel: Accel, cpu: &str, memory_mib: u32, vcpus: u32) -> Vec<String> {
    let memory = memory_mib.to_string();
    let vcpus = vcpus.to_string();
    [
        "-name",
        name,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
        "-machine",
        "pc",
        "-accel",
        accel.qemu_name(),
        "-cpu",
        cpu,
        "-m",
        &memory,
        "-smp",
        &vcpus,
        "-sandbox",
        SANDBOX,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The next serial port, written to the inherited pipe `fd`. `append=on`: without it qemu
/// truncates the descriptor, which a pipe refuses (EINVAL).
fn serial_args(fd: i32, fdset: u32, id: &str) -> [String; 6] {
    [
        "-add-fd".into(),
        format!("fd={fd},set={fdset},opaque={id}"),
        "-chardev".into(),
        format!("file,id={id},path=/dev/fdset/{fdset},append=on"),
        "-serial".into(),
        format!("chardev:{id}"),
    ]
}

/// Memory of the KVM probe's guest: enough for the kernel to reach its first console line.
pub const PROBE_MEMORY_MIB: u32 = 128;
/// Kernel command line of the KVM probe: print from the first instructions on
/// (`earlyprintk`), and no initramfs to look for (the kernel then panics, and -no-reboot
/// ends qemu, unless the probe killed it at the first line).
pub const PROBE_KERNEL_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 acpi=off nokaslr";

/// The KVM probe: the helper kernel alone under `-accel kvm -cpu CPU`, confined like the helper
/// VM, with its serial console on `console_fd` (argument list without the program name).
pub fn probe_args(cpu: &str, kernel_fd: i32, console_fd: i32) -> Vec<String> {
    let mut a = machine_args("imgforge-kvm-probe", Accel::Kvm, cpu, PROBE_MEMORY_MIB, 1);
    a.extend(["-kernel".into(), format!("/proc/self/fd/{kernel_fd}"), "-append".into(), PROBE_KERNEL_CMDLINE.into()]);
    a.extend(serial_args(console_fd, FDSET_CONSOLE, "console"));
    a
}

/// What the target disk's device does when a read or write of it (or of its overlay) fails:
/// pause the VM, which the host sees and fails the run on. Never `report`: the guest's `sync`
/// ignores lost writes, and the helper reported SUCCESS over them (tried with a full TMPDIR).
/// qemu's default stops on ENOSPC only and reports any other error to the guest.
const DISK_ERROR_POLICY: &str = "werror=stop,rerror=stop";

/// Builds the argument list (without the program name).
pub fn args(c: &QemuConfig) -> Vec<String> {
    let mut a = machine_args("imgforge-helper", c.accel, &c.cpu, c.memory_mib, c.vcpus);
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-kernel", &format!("/proc/self/fd/{}", c.kernel_fd), "-initrd", &format!("/proc/self/fd/{}", c.initrd_fd)]);
    push(&["-append", &c.kernel_cmdline]);

    // -blockdev with explicit drivers: nothing is probed, and a backing chain is built from
    // node names, never from a path recorded in an image.
    let direct = |d: bool| if d { "on" } else { "off" };
    push(&["-add-fd", &format!("fd={},set={FDSET_DISK},opaque=target-ro", c.disk_ro_fd)]);
    if let Some(rw) = c.disk_rw_fd {
        push(&["-add-fd", &format!("fd={rw},set={FDSET_DISK},opaque=target-rw")]);
    }
    let base_ro = if c.disk_rw_fd.is_none() { ",read-only=on" } else { "" };
    push(&[
        "-blockdev",
        &format!(
            "driver={},node-name=disk-file,filename=/dev/fdset/{FDSET_DISK},cache.direct={},aio=threads{base_ro}",
            protocol_driver(c.disk_is_device),
            direct(c.disk_direct)
        ),
    ]);
    // A qcow2 disk gets no backing file, whatever its header names (`backing=` is null in
    // qemu's key=value syntax). qemu has no such pin for an external data file (a null
    // `data-file` is refused): the qcow2 check refuses those before qemu runs.
    let no_backing = if c.disk_format == DiskFormat::Qcow2 { ",backing=" } else { "" };
    push(&[
        "-blockdev",
        &format!("driver={},node-name=disk,file=disk-file{no_backing}{base_ro}", c.disk_format.as_str()),
    ]);
    let top = match c.overlay {
        Some(o) => {
            push(&["-add-fd", &format!("fd={},set={FDSET_OVERLAY},opaque=overlay-ro", o.ro_fd)]);
            push(&["-add-fd", &format!("fd={},set={FDSET_OVERLAY},opaque=overlay-rw", o.rw_fd)]);
            // The guest's flushes (journal commits, every fsync of a package install) do not
            // reach the host's disk: the overlay is scratch until the commit, which flushes the
            // disk it writes; a run that does not end in success drops the overlay anyway.
            push(&["-blockdev", &format!("driver=file,node-name=overlay-file,filename=/dev/fdset/{FDSET_OVERLAY},cache.direct={},cache.no-flush=on,aio=threads", direct(o.direct))]);
            push(&["-blockdev", "driver=qcow2,node-name=overlay,file=overlay-file,backing=disk,cache.no-flush=on"]);
            "overlay"
        }
        None => "disk",
    };
    push(&["-device", &format!("virtio-blk-pci,drive={top},serial={TARGET_SERIAL},{DISK_ERROR_POLICY}")]);
    for (i, d) in c.extra_disks.iter().enumerate() {
        // Named by the guest's disk number (the second -a is 2), as its serial is.
        let n = i + 2;
        let (disk_set, overlay_set) = (FDSET_EXTRA_DISKS + 2 * i as u32, FDSET_EXTRA_DISKS + 2 * i as u32 + 1);
        push(&["-add-fd", &format!("fd={},set={disk_set},opaque=disk{n}-ro", d.ro_fd)]);
        push(&[
            "-blockdev",
            &format!(
                "driver={},node-name=disk{n}-file,filename=/dev/fdset/{disk_set},cache.direct={},aio=threads,read-only=on",
                protocol_driver(d.is_device),
                direct(d.direct)
            ),
        ]);
        let no_backing = if d.format == DiskFormat::Qcow2 { ",backing=" } else { "" };
        push(&[
            "-blockdev",
            &format!("driver={},node-name=disk{n},file=disk{n}-file{no_backing},read-only=on", d.format.as_str()),
        ]);
        push(&["-add-fd", &format!("fd={},set={overlay_set},opaque=overlay{n}-ro", d.overlay.ro_fd)]);
        push(&["-add-fd", &format!("fd={},set={overlay_set},opaque=overlay{n}-rw", d.overlay.rw_fd)]);
        push(&["-blockdev", &format!("driver=file,node-name=overlay{n}-file,filename=/dev/fdset/{overlay_set},cache.direct={},cache.no-flush=on,aio=threads", direct(d.overlay.direct))]);
        push(&[
            "-blockdev",
            &format!("driver=qcow2,node-name=overlay{n},file=overlay{n}-file,backing=disk{n},cache.no-flush=on"),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=overlay{n},serial={},{DISK_ERROR_POLICY}", disk_serial(i + 1)),
        ]);
    }
    // Every overlay reads the one base node: the base is read once, whatever the variants.
    for (i, (o, serial)) in c.more_overlays.iter().enumerate() {
        let set = FDSET_MORE_OVERLAYS + i as u32;
        push(&["-add-fd", &format!("fd={},set={set},opaque=variant{i}-ro", o.ro_fd)]);
        push(&["-add-fd", &format!("fd={},set={set},opaque=variant{i}-rw", o.rw_fd)]);
        push(&["-blockdev", &format!("driver=file,node-name=variant{i}-file,filename=/dev/fdset/{set},cache.direct={},cache.no-flush=on,aio=threads", direct(o.direct))]);
        push(&[
            "-blockdev",
            &format!("driver=qcow2,node-name=variant{i},file=variant{i}-file,backing=disk,cache.no-flush=on"),
        ]);
        push(&["-device", &format!("virtio-blk-pci,drive=variant{i},serial={serial},{DISK_ERROR_POLICY}")]);
    }

    push(&["-add-fd", &format!("fd={},set={FDSET_FLOPPY},opaque=rules-floppy", c.floppy_fd)]);
    push(&["-drive", &format!("file=/dev/fdset/{FDSET_FLOPPY},format=raw,if=floppy,index=0,readonly=on")]);

    if let Some(fd) = c.payload_fd {
        push(&["-add-fd", &format!("fd={fd},set={FDSET_PAYLOAD},opaque=payload")]);
        push(&["-drive", &format!("file=/dev/fdset/{FDSET_PAYLOAD},format=raw,if=none,id=payload,readonly=on")]);
        push(&["-device", &format!("virtio-blk-pci,drive=payload,serial={PAYLOAD_SERIAL}")]);
    }
    if let Some((ro, rw)) = c.export_fds {
        push(&["-add-fd", &format!("fd={ro},set={FDSET_EXPORT},opaque=digest-export-ro")]);
        push(&["-add-fd", &format!("fd={rw},set={FDSET_EXPORT},opaque=digest-export-rw")]);
        push(&["-drive", &format!("file=/dev/fdset/{FDSET_EXPORT},format=raw,if=none,id=export")]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=export,serial={}", imgforge_protocol::digest_cache::EXPORT_SERIAL),
        ]);
    }
    if let Some(fd) = c.import_fd {
        // qemu reads it through the host's page cache (no cache.direct), which holds what the
        // host writes while the VM runs; the helper reads it past its own cache (O_DIRECT).
        push(&["-add-fd", &format!("fd={fd},set={FDSET_IMPORT},opaque=digest-import")]);
        push(&["-drive", &format!("file=/dev/fdset/{FDSET_IMPORT},format=raw,if=none,id=import,readonly=on")]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=import,serial={}", imgforge_protocol::digest_cache::IMPORT_SERIAL),
        ]);
    }
    if let Some(fd) = c.bulk_fd {
        // Read by the helper with O_DIRECT: qemu copies each request straight into the guest's
        // buffer from the host's page cache (the host just wrote the file), with host memcpy.
        push(&["-add-fd", &format!("fd={fd},set={FDSET_BULK},opaque=bulk")]);
        push(&[
            "-blockdev",
            &format!("driver=file,node-name=bulk-file,filename=/dev/fdset/{FDSET_BULK},aio=threads,read-only=on"),
        ]);
        push(&["-blockdev", "driver=raw,node-name=bulk,file=bulk-file,read-only=on"]);
        push(&["-device", &format!("virtio-blk-pci,drive=bulk,serial={BULK_SERIAL}")]);
    }

    push(&serial_args(c.console_fd, FDSET_CONSOLE, "console").each_ref().map(String::as_str));
    push(&serial_args(c.report_fd, FDSET_REPORT, "report").each_ref().map(String::as_str));

    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", c.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            accel: Accel::Tcg,
            cpu: super::super::accel::TCG_CPU.into(),
            memory_mib: 512,
            vcpus: 1,
            kernel_cmdline: "console=ttyS0".into(),
            kernel_fd: 10,
            initrd_fd: 11,
            disk_ro_fd: 12,
            disk_rw_fd: Some(13),
            overlay: None,
            extra_disks: Vec::new(),
            more_overlays: Vec::new(),
            disk_format: DiskFormat::Raw,
            disk_direct: true,
            disk_is_device: false,
            floppy_fd: 14,
            payload_fd: None,
            export_fds: None,
            import_fd: None,
            bulk_fd: None,
            console_fd: 15,
            report_fd: 16,
            qmp_fd: 17,
        }
    }

    fn joined(c: &QemuConfig) -> String {
        args(c).join(" ")
    }

    #[test]
    fn confined_and_path_free() {
        let line = joined(&config());
        for want in [
            "-nodefaults",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny",
            "-no-reboot",
            "driver=raw,node-name=disk,file=disk-file",
            "cache.direct=on",
            "drive=disk,",
            "-kernel /proc/self/fd/10",
            "fd=12,set=1",
            "fd=13,set=1",
            "socket,id=qmp,fd=17,server=on",
        ] {
            assert!(line.contains(want), "{want} missing from {line}");
        }
        // No network, no -runas (gone in qemu 9.1, SIGSYS with the sandbox on 7.2).
        for unwanted in ["-netdev", "-nic", "-runas", "-run-with", "payload"] {
            assert!(!line.contains(unwanted), "{unwanted} in {line}");
        }
        // Every path qemu opens is an fdset or an inherited descriptor.
        for arg in args(&config()) {
            for part in arg.split(',') {
                if let Some(path) = part.strip_prefix("filename=").or_else(|| part.strip_prefix("path=")) {
                    assert!(path.starts_with("/dev/fdset/"), "{arg}");
                }
                if let Some(file) = part.strip_prefix("file=") {
                    assert!(file.starts_with("/dev/fdset/") || !file.contains('/'), "{arg}");
                }
            }
        }
    }

    #[test]
    fn probe_is_the_bare_kernel_under_kvm() {
        let line = probe_args("host,-arch-capabilities", 7, 8).join(" ");
        for want in [
            "-accel kvm -cpu host,-arch-capabilities",
            "-sandbox on,",
            "-no-reboot",
            "-kernel /proc/self/fd/7",
            "fd=8,set=4",
            "earlyprintk=serial,ttyS0",
        ] {
            assert!(line.contains(want), "{want} missing from {line}");
        }
        for unwanted in ["-initrd", "-blockdev", "-drive", "-netdev", "-mon"] {
            assert!(!line.contains(unwanted), "{unwanted} in {line}");
        }
        assert!(joined(&config()).contains("-accel tcg -cpu max,la57=off,erms=off,fsrm=off -m 512 -smp 1"));
    }

    #[test]
    fn memory_and_vcpus_as_given() {
        let mut c = config();
        c.memory_mib = 384;
        c.vcpus = 2;
        assert!(joined(&c).contains(" -m 384 -smp 2 "), "{}", joined(&c));
        assert!(probe_args("max", 7, 8).join(" ").contains(" -smp 1 "), "the KVM probe keeps one vCPU");
    }

    #[test]
    fn payload_and_cache_modes() {
        let mut c = config();
        c.payload_fd = Some(20);
        c.export_fds = Some((21, 22));
        c.disk_direct = false;
        c.disk_format = DiskFormat::Qcow2;
        let line = joined(&c);
        assert!(
            line.contains("fd=20,set=3") && line.contains("serial=imgforge-payload") && line.contains("readonly=on")
        );
        assert!(line.contains("fd=22,set=8") && line.contains("drive=export,serial=imgforge-export"), "{line}");
        assert!(!line.contains("imgforge-import"), "no import disk unless asked for");
        c.import_fd = Some(23);
        let with_import = joined(&c);
        assert!(
            with_import.contains("fd=23,set=9,opaque=digest-import")
                && with_import.contains("file=/dev/fdset/9,format=raw,if=none,id=import,readonly=on")
                && with_import.contains("drive=import,serial=imgforge-import"),
            "{with_import}"
        );
        c.import_fd = None;
        assert!(
            line.contains("cache.direct=off") && line.contains("driver=qcow2,node-name=disk,file=disk-file,backing= ")
        );
        c.overlay = Some(OverlayFds { ro_fd: 30, rw_fd: 31, direct: false });
        c.disk_rw_fd = None;
        let line = joined(&c);
        assert!(
            line.contains("read-only=on") && line.contains("backing=disk") && line.contains("drive=overlay,"),
            "{line}"
        );
        assert!(!line.contains("fd=13"));
        assert!(line.contains("drive=overlay,serial=imgforge-target,werror=stop,rerror=stop"), "{line}");
    }

    /// Every other disk is read only through an overlay of its own, under its own serial, on
    /// fdsets of its own, after the target and before the payload.
    #[test]
    fn other_disks_each_behind_an_overlay() {
        let mut c = config();
        c.disk_rw_fd = None;
        c.overlay = Some(OverlayFds { ro_fd: 30, rw_fd: 31, direct: true });
        c.payload_fd = Some(20);
        let extra = |ro_fd, format, overlay: i32| ExtraDiskFds {
            ro_fd,
            format,
            direct: true,
            is_device: false,
            overlay: OverlayFds { ro_fd: overlay, rw_fd: overlay + 1, direct: false },
        };
        c.extra_disks = vec![extra(40, DiskFormat::Raw, 41), extra(50, DiskFormat::Qcow2, 51)];
        let line = joined(&c);
        for want in [
            "fd=40,set=10,opaque=disk2-ro",
            "driver=file,node-name=disk2-file,filename=/dev/fdset/10,cache.direct=on,aio=threads,read-only=on",
            "driver=raw,node-name=disk2,file=disk2-file,read-only=on",
            "fd=41,set=11,opaque=overlay2-ro",
            "fd=42,set=11,opaque=overlay2-rw",
            "driver=qcow2,node-name=overlay2,file=overlay2-file,backing=disk2,",
            "drive=overlay2,serial=imgforge-disk-2,werror=stop,rerror=stop",
            "fd=50,set=12,opaque=disk3-ro",
            "driver=qcow2,node-name=disk3,file=disk3-file,backing=,read-only=on",
            "fd=52,set=13,opaque=overlay3-rw",
            "drive=overlay3,serial=imgforge-disk-3,",
        ] {
            assert!(line.contains(want), "{want} missing from {line}");
        }
        let order = |s: &str| line.find(s).unwrap();
        assert!(order("serial=imgforge-target") < order("serial=imgforge-disk-2"));
        assert!(order("serial=imgforge-disk-2") < order("serial=imgforge-disk-3"));
        assert!(order("serial=imgforge-disk-3") < order("serial=imgforge-payload"));
    }

    /// A multi-variant run: each more overlay is a virtio disk of its own, its own fdset, backed
    /// by the one read-only base node.
    #[test]
    fn more_overlays_share_the_base() {
        let mut c = config();
        c.disk_rw_fd = None;
        c.overlay = Some(OverlayFds { ro_fd: 30, rw_fd: 31, direct: false });
        c.more_overlays = vec![
            (OverlayFds { ro_fd: 40, rw_fd: 41, direct: true }, "imgforge-v1".into()),
            (OverlayFds { ro_fd: 42, rw_fd: 43, direct: false }, "imgforge-v2".into()),
        ];
        let line = joined(&c);
        for want in [
            "fd=40,set=1000,opaque=variant0-ro",
            "fd=43,set=1001,opaque=variant1-rw",
            "driver=qcow2,node-name=variant0,file=variant0-file,backing=disk,",
            "driver=qcow2,node-name=variant1,file=variant1-file,backing=disk,",
            "drive=variant1,serial=imgforge-v2,werror=stop,rerror=stop",
            "filename=/dev/fdset/1000,cache.direct=on",
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
        assert_eq!(line.matches("virtio-blk-pci").count(), 3, "{line}");
    }
}
