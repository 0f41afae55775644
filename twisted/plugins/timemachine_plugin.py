from twisted.application.service import ServiceMaker

timemachine = ServiceMaker(
    "timeMachine",
    "timemachine.tap",
    "A distributed, fault-tolerant scheduler database.",
    "timemachine",
)
