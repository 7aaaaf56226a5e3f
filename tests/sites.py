"""Site-file fragments shared by test modules."""

#: A simulated dilution cryostat that moves fast (time constants of tens of milliseconds),
#: read by the Lake Shore 372 driver every 20 ms: the mixing-chamber temperature with a
#: latching alarm, the still heater and the heater range, behind resource ``cryostat``
#: (which the including site declares). The ``simulations`` and ``instruments`` sections.
FAST_CRYOSTAT = """\
simulations:
  cryo:
    model: cryostat
    options:
      tau_s: {mxc: 0.05, still: 0.05}
      warm_tau_s: {50K: 2.0, 4K: 2.0, still: 0.3, mxc: 0.3}
      circulation_limit_k: 295
instruments:
  - name: bridge
    driver: lakeshore372
    simulation: cryo
    lock_resource: cryostat
    scan_s: 0.02
    pvs:
      - name: "CRYO:MXC:TEMP"
        type: float64
        unit: K
        channel: "temperature:6"
        alarm: {high: 0.05, hihi: 0.1, hysteresis: 0.002, latch: true, guidance: "check the compressor"}
      - {name: "CRYO:STILL:HTR", type: float64, unit: "%", channel: "manual_output:2", writable: true, drive: [0, 100]}
      - {name: "CRYO:MXC:HTR:RANGE", type: enum, channel: "heater_range:0", writable: true, states: [Off, r1, r2, r3, r4, r5, r6, r7, r8]}
"""
