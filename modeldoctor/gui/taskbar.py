"""Progress on the dock or taskbar icon where the desktop supports it: the Unity LauncherEntry D-Bus
signal, which KDE Plasma's task manager, Ubuntu's dock, Dash to Dock and Plank read. Qt 6 itself
has no taskbar-progress API (QWinTaskbarProgress was dropped), so elsewhere this does nothing."""

from __future__ import annotations

DESKTOP_ID = "application://modeldoctor.desktop"  # packaging/modeldoctor.desktop
OBJECT_PATH = "/com/modeldoctor/launcher"
INTERFACE = "com.canonical.Unity.LauncherEntry"


class TaskbarProgress:
    def __init__(self) -> None:
        try:
            from PySide6.QtDBus import QDBusConnection
        except ImportError:  # a Qt build without D-Bus (Windows, macOS)
            self._bus = None
        else:
            bus = QDBusConnection.sessionBus()
            self._bus = bus if bus.isConnected() else None
        self.shown: float | None = None  # the fraction last sent; None: no progress shown

    @property
    def available(self) -> bool:
        return self._bus is not None

    def message(self, fraction: float | None):
        """The signal that shows `fraction` (0..1) on the icon, or hides the bar for None."""
        from PySide6.QtDBus import QDBusMessage

        message = QDBusMessage.createSignal(OBJECT_PATH, INTERFACE, "Update")
        properties = {"progress-visible": fraction is not None}
        if fraction is not None:
            properties["progress"] = float(min(max(fraction, 0.0), 1.0))
        message.setArguments([DESKTOP_ID, properties])
        return message

    def set(self, fraction: float | None) -> None:
        if fraction == self.shown:
            return
        self.shown = fraction
        if self._bus is not None:
            self._bus.send(self.message(fraction))
