"""The guest image: in-guest C programs and the initramfs that carries them and guest/init."""
