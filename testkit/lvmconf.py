"""lvm2's configuration for the test VMs' own lvm2 commands (the VM lane's guest, the e2e lane's
lvm node): nothing is left to udev, whether or not the guest runs one."""

#: libdevmapper makes the /dev/mapper nodes and /dev/VG/LV links itself, and no dmeventd is
#: started (it would hold devices open at teardown).
LVM_CONF_WITHOUT_UDEV = """\
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
"""
